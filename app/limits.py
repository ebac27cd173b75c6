"""Request bodies over the upload limit are refused while they stream in, before anything is decoded."""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: 413 when Content-Length or the bytes actually received exceed the route's limit.

    Counting happens in `receive`, so the multipart parser stops at the limit. FastAPI turns errors
    raised while parsing a body into 400; when the limit caused it, the 413 is sent instead."""

    def __init__(
        self, app: ASGIApp, limit_for: Callable[[str], int | None], on_refused: Callable[[], None]
    ) -> None:
        self.app, self.limit_for, self.on_refused = app, limit_for, on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit_for(scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, limit)
            return
        received, exceeded, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:  # whatever the app answers to the cut-off body, the answer is 413
                if not started:
                    started = True
                    await self._refuse(send, limit)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            if not started:
                await self._refuse(send, limit)

    async def _refuse(self, send: Send, limit: int) -> None:
        self.on_refused()
        body = json.dumps(
            {
                "error": {
                    "status": 413,
                    "type": "payload_too_large",
                    "message": f"request body over {limit:,} bytes",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
