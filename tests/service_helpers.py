"""The HTTP service in-process for tests: settings for a tiny model, the app with its lifespan run by
hand behind an httpx ASGI transport, and small request helpers."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from app.main import create_app
from app.settings import Settings


def settings_for(refs: Path, index: Path, ckpt: Path, **overrides) -> Settings:
    return Settings(references=refs, index_dir=index, checkpoint=str(ckpt), device="cpu", **overrides)


@asynccontextmanager
async def running(settings: Settings):
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield app, client


def jpeg(path: Path) -> bytes:
    return path.read_bytes()


def files(data: bytes, name: str = "photo.jpg") -> dict:
    return {"image": (name, data, "application/octet-stream")}


async def wait_idle(client: httpx.AsyncClient, timeout: float = 60) -> dict:
    for _ in range(int(timeout / 0.05)):
        status = (await client.get("/index/status")).json()
        if status["state"] != "running":
            return status
        await asyncio.sleep(0.05)
    raise AssertionError("rebuild did not finish")
