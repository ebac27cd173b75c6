"""Guards that run before a request body is read: the admin key, the body size, the size and number of
multipart parts. They are ASGI middleware because FastAPI parses (and spools) a form before any
dependency runs, so a check in a dependency comes after the whole upload has arrived."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _Refused(Exception):
    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message


def route_path(scope: Scope) -> str:
    """The path the routes see: without the `--root-path` prefix when the server put it in `path`."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


async def send_error(send: Send, status: int, type_: str, message: str, headers: dict | None = None) -> None:
    body = json.dumps({"error": {"status": status, "type": type_, "message": message}}).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ApiKeyGate:
    """ASGI middleware: 401 for a missing or wrong X-API-Key, from the headers alone, before a byte of the
    body is read. `key_for(method, path)` is the key a route needs, None for an open route."""

    def __init__(
        self,
        app: ASGIApp,
        key_for: Callable[[str, str], str | None],
        on_refused: Callable[[], None],
    ) -> None:
        self.app, self.key_for, self.on_refused = app, key_for, on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        expected = self.key_for(scope["method"], route_path(scope)) if scope["type"] == "http" else None
        if expected is not None:
            given = dict(scope.get("headers") or []).get(b"x-api-key", b"")
            if not hmac.compare_digest(given, expected.encode()):
                self.on_refused()
                await send_error(send, 401, "unauthorized", "missing or wrong X-API-Key header")
                return
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class UploadLimits:
    """What one upload route accepts: the whole body, each multipart part, and the number of parts."""

    body_bytes: int
    part_bytes: int
    max_parts: int


class BodySizeLimit:
    """ASGI middleware: 413 when Content-Length, the bytes received, one multipart part or the number of
    parts exceed the route's limits, counted while the body streams in (so nothing over a limit is ever
    buffered or spooled). FastAPI turns errors raised while parsing a body into 400; when a limit
    caused it, the 413 is sent instead."""

    def __init__(
        self,
        app: ASGIApp,
        limits_for: Callable[[str], UploadLimits | None],
        on_refused: Callable[[], None],
    ) -> None:
        self.app, self.limits_for, self.on_refused = app, limits_for, on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limits = self.limits_for(route_path(scope)) if scope["type"] == "http" else None
        if limits is None:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.body_bytes:
            await self._refuse(send, _too_large(f"request body over {limits.body_bytes:,} bytes"))
            return
        parts = _PartCounter.for_content_type(headers.get(b"content-type", b""), limits)
        received, refusal, started = 0, None, False

        async def counting_receive() -> Message:
            nonlocal received, refusal
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                try:
                    if received > limits.body_bytes:
                        raise _too_large(f"request body over {limits.body_bytes:,} bytes")
                    if parts is not None:
                        parts.feed(chunk)
                except _Refused as exc:
                    refusal = exc
                    raise
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal is not None:  # whatever the app answers to the cut-off body, the answer is 413
                if not started:
                    started = True
                    await self._refuse(send, refusal)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _Refused as exc:
            if not started:
                await self._refuse(send, exc)

    async def _refuse(self, send: Send, refusal: _Refused) -> None:
        self.on_refused()
        await send_error(send, refusal.status, refusal.type, refusal.message)


def _too_large(message: str) -> _Refused:
    return _Refused(413, "payload_too_large", message)


class _PartCounter:
    """A second, size-only multipart parse of the stream: counts parts and the bytes of each."""

    def __init__(self, boundary: bytes, limits: UploadLimits) -> None:
        self.limits, self.parts, self.part_bytes = limits, 0, 0
        self.parser: MultipartParser | None = MultipartParser(
            boundary,
            {"on_part_begin": self._begin, "on_part_data": self._data},
        )

    @classmethod
    def for_content_type(cls, content_type: bytes, limits: UploadLimits) -> _PartCounter | None:
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            return None  # not multipart: the body limit applies, and FastAPI refuses the form itself
        return cls(boundary, limits)

    def feed(self, chunk: bytes) -> None:
        if chunk and self.parser is not None:
            try:
                self.parser.write(chunk)
            except _Refused:
                raise
            except Exception:  # malformed multipart: FastAPI's own parser answers 400 for it
                self.parser = None

    def _begin(self) -> None:
        self.parts, self.part_bytes = self.parts + 1, 0
        if self.parts > self.limits.max_parts:
            raise _too_large(f"more than {self.limits.max_parts} form fields")

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.part_bytes += end - start
        if self.part_bytes > self.limits.part_bytes:
            raise _too_large(f"a form field or image over {self.limits.part_bytes:,} bytes")
