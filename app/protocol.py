"""uvicorn's HTTP/1.1 protocol (h11) with deadlines for reading each request.

uvicorn closes nothing while it waits for a request's head: a socket that connects and sends nothing, or
a header line now and then, is held for ever. Its `limit_concurrency` (our max_connections) counts those
sockets, so as many idle connections made every other client get 503 (tested with 4:
tests/e2e/test_serve_process.py). Here each request head must arrive within `head_timeout_s` of the
connection being ready for it (connected, or the previous response sent), and each body within
`body_timeout_s` of its head; past either the connection is closed, and a request whose body stopped
sees a disconnect.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class DeadlineH11Protocol(H11Protocol):
    head_timeout_s: float = 10.0
    body_timeout_s: float = 120.0

    _deadline: asyncio.TimerHandle | None = None
    _waiting_for: object = None  # the h11 state the deadline is for: IDLE (a head) or SEND_BODY

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Arm the deadline for what the client owes now (a head or a body), unless it is already armed
        for that; nothing while the server is the one to answer."""
        state = self.conn.their_state
        if state is self._waiting_for and self._deadline is not None:
            return
        self._cancel()
        if self.transport.is_closing():
            return
        if state is h11.IDLE:
            self._arm(state, self.head_timeout_s)
        elif state is h11.SEND_BODY:
            self._arm(state, self.body_timeout_s)

    def _arm(self, state: object, seconds: float) -> None:
        self._waiting_for = state
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._waiting_for = None, None

    def _expired(self) -> None:
        self._deadline = None
        if self.conn.their_state is self._waiting_for and not self.transport.is_closing():
            what = "request head" if self._waiting_for is h11.IDLE else "request body"
            self.logger.info("closing a connection: no complete %s in time", what)
            self.transport.close()


def deadline_protocol(head_timeout_s: float, body_timeout_s: float) -> type[DeadlineH11Protocol]:
    """The protocol class to give uvicorn (`http=`), with these deadlines."""
    return type(
        "ServiceH11Protocol",
        (DeadlineH11Protocol,),
        {"head_timeout_s": head_timeout_s, "body_timeout_s": body_timeout_s},
    )
