"""Answering a request in bounded time: its work is dropped when the client goes or the deadline passes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from app.errors import ApiError, ServiceUnavailable
from app.settings import Settings

DISCONNECT_POLL_S = 0.25
T = TypeVar("T")


async def answered_in_time(request: Request, settings: Settings, work: Awaitable[T]) -> T:
    """`work`, cancelled (its queued queries dropped) when the client disconnects or the deadline
    (request_timeout_s) passes; 503 then."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait(
            {task, watcher}, timeout=settings.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if watcher in done:
        raise ApiError(499, "client_closed_request", "the client disconnected; the work was dropped")
    raise ServiceUnavailable(
        f"not answered within {settings.request_timeout_s:g} s; retry later", settings.retry_after_s
    )


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
