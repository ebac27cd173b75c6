"""Hardening, in-process: what runs before a body is read, safe defaults, the bounded and fair batcher,
all-or-nothing uploads, and references that are not what they seem."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import shutil
import threading

import anyio
import pytest
from PIL import Image
from pydantic import ValidationError

from app import references
from app.errors import ApiError
from app.limits import ApiKeyGate, BodySizeLimit, UploadLimits
from app.main import create_app
from app.settings import ExposureError, Settings, check_exposure
from index_builder.builder import BuildConfig, build_index
from index_builder.sources import scan_references
from model.options import ModelOptions
from tests.service_helpers import files, jpeg, running, settings_for, wait_idle

pytestmark = pytest.mark.anyio
BOUNDARY = b"XyZ"


def multipart(parts: list[tuple[str, bytes]]) -> bytes:
    body = b""
    for i, (field, data) in enumerate(parts):
        body += b"--" + BOUNDARY + b"\r\n"
        body += f'Content-Disposition: form-data; name="{field}"; filename="f{i}.jpg"\r\n'.encode()
        body += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    return body + b"--" + BOUNDARY + b"--\r\n"


class Recorder:
    """An ASGI conversation: a body fed in chunks, how many bytes the app pulled, what it answered."""

    def __init__(self, body: bytes, chunk: int = 4096) -> None:
        self.chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
        self.pulled, self.sent = 0, []

    async def receive(self):
        chunk = self.chunks.pop(0) if self.chunks else b""
        self.pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}

    async def send(self, message):
        self.sent.append(message)

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")


def scope(path: str, headers: dict[bytes, bytes] | None = None, root_path: str = "") -> dict:
    return {
        "type": "http",
        "method": "POST",
        "path": root_path + path,
        "root_path": root_path,
        "headers": list((headers or {}).items()),
    }


async def reading_app(scope, receive, send):
    """Reads the whole body, then answers 200: what FastAPI does before any dependency runs."""
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize("root_path", ["", "/vpr"])
async def test_wrong_key_is_refused_before_a_byte_of_the_body(root_path):
    gate = ApiKeyGate(
        reading_app, lambda m, p: "k" if p == "/index/images" else None, on_refused=lambda: None
    )
    wrong = Recorder(b"x" * 400_000)
    await gate(scope("/index/images", {b"x-api-key": b"nope"}, root_path), wrong.receive, wrong.send)
    assert wrong.status == 401 and wrong.pulled == 0
    right = Recorder(b"x" * 10)
    await gate(scope("/index/images", {b"x-api-key": b"k"}, root_path), right.receive, right.send)
    assert right.status == 200 and right.pulled == 10


@pytest.mark.parametrize("root_path", ["", "/vpr"])
async def test_a_part_over_the_limit_is_refused_while_it_streams(root_path):
    limits = UploadLimits(body_bytes=10_000_000, part_bytes=50_000, max_parts=4)
    guard = BodySizeLimit(reading_app, lambda p: limits if p == "/localize" else None, lambda: None)
    body = multipart([("image", b"a" * 1000), ("image", b"b" * 3_000_000)])
    headers = {b"content-type": b"multipart/form-data; boundary=" + BOUNDARY}
    big = Recorder(body)
    await guard(scope("/localize", headers, root_path), big.receive, big.send)
    assert big.status == 413 and big.pulled < 100_000  # stopped right after the part went over
    many = Recorder(multipart([("image", b"c")] * 5))
    await guard(scope("/localize", headers, root_path), many.receive, many.send)
    assert many.status == 413
    fine = Recorder(multipart([("image", b"d" * 40_000)] * 4))
    await guard(scope("/localize", headers, root_path), fine.receive, fine.send)
    assert fine.status == 200


def test_a_wrong_precision_is_refused_at_start_not_on_every_query(monkeypatch):
    """SELAVPR_PRECISION="" once made every /localize a 500 (the matcher refused the empty name)."""
    monkeypatch.setenv("SELAVPR_PRECISION", "")
    assert Settings().precision is None  # empty or "default": the device's default
    assert Settings(precision="default").precision is None
    assert Settings(precision="int8+float32").precision == "int8+float32"
    with pytest.raises(ValidationError, match="unknown precision 'int4'"):
        Settings(precision="int4")


def test_empty_key_is_an_error_and_open_admin_beyond_loopback_is_refused(caplog):
    with pytest.raises(ValidationError, match="empty API key"):
        Settings(api_key="")
    with pytest.raises(ValidationError, match="empty API key"):
        Settings(localize_api_key="  ")
    for host in ("127.0.0.1", "::1", "localhost"):
        check_exposure(Settings(host=host))
    for host in ("0.0.0.0", "::", "192.0.2.7", "example.org"):
        with pytest.raises(ExposureError, match="SELAVPR_API_KEY"):
            check_exposure(Settings(host=host))
        with pytest.raises(ExposureError):
            create_app(Settings(host=host))
        check_exposure(Settings(host=host, api_key="k"))
    with caplog.at_level(logging.WARNING):
        check_exposure(Settings(host="0.0.0.0", insecure_open_admin=True))
    assert "OPEN to anyone" in caplog.text


async def test_serve_refuses_to_start_open_beyond_loopback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELAVPR_")}
    env["SELAVPR_CACHE_DIR"] = os.environ.get("SELAVPR_CACHE_DIR", "")
    proc = await asyncio.create_subprocess_exec(
        *(os.sys.executable, "-m", "app.cli", "serve", "--host", "0.0.0.0", "--port", "1"),
        "--index-dir",
        str(tmp_path / "i"),
        "--references",
        str(tmp_path / "r"),
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2 and b"without an admin key" in err
    assert not (tmp_path / "i").exists()  # refused before touching the disk


# --- the service ----------------------------------------------------------------------------------------


async def test_candidate_budget_and_full_queue(workspace, tiny_ckpt):
    refs, index = workspace
    query = jpeg(refs / "p0" / "i0" / "Image001.jpg")
    settings = settings_for(refs, index, tiny_ckpt, max_candidates_per_request=300)
    async with running(settings) as (app, client):
        batch = [("image", ("q.jpg", query, "image/jpeg"))] * 4
        over = await client.post("/localize/batch", files=batch, data={"rerank_k": "100"})
        assert over.status_code == 422 and "candidates" in over.json()["error"]["message"]
        assert (
            await client.post("/localize/batch", files=batch[:3], data={"rerank_k": "100"})
        ).status_code == 200
        pairs = await client.post("/localize/pairs", files=files(query), data={"reference_id": "0"})
        assert pairs.status_code == 200 and pairs.json()["mnn_matches"] > 0
        app.state.service.batcher.max_queued = 0
        full = await client.post("/localize", files=files(query))
        assert full.status_code == 503 and full.headers["retry-after"] == "2"
        # 'why this match' queues with the /localize queries: it ran beside them, unbounded, before
        full = await client.post("/localize/pairs", files=files(query), data={"reference_id": "0"})
        assert full.status_code == 503 and full.headers["retry-after"] == "2"


async def test_heavy_queries_cannot_hold_up_ordinary_ones(workspace, tiny_ckpt):
    """Queries over heavy_rerank_k run in their own lane: while one is stuck, ordinary queries are
    answered. With one lane an ordinary query waited for whole expensive batches (7.1x the idle p95 with
    a 1,024-image index, docs/benchmarks.md); here it would wait for ever."""
    refs, index = workspace
    query = jpeg(refs / "p0" / "i0" / "Image001.jpg")
    async with running(settings_for(refs, index, tiny_ckpt, heavy_rerank_k=200)) as (app, client):
        service, release = app.state.service, threading.Event()
        run_batch = service.heavy.run_batch

        def stuck(jobs):
            release.wait(30)
            return run_batch(jobs)

        service.heavy.run_batch = stuck
        heavy = asyncio.ensure_future(client.post("/localize", files=files(query), data={"rerank_k": "500"}))
        await asyncio.sleep(0.3)
        ordinary = await asyncio.wait_for(client.post("/localize", files=files(query)), 20)
        assert ordinary.status_code == 200 and not heavy.done()
        release.set()
        assert (await asyncio.wait_for(heavy, 30)).status_code == 200


async def test_killed_worker_shows_in_readyz_and_recovers(workspace, tiny_ckpt):
    refs, index = workspace
    async with running(settings_for(refs, index, tiny_ckpt)) as (app, client):
        assert (await client.get("/readyz")).status_code == 200
        app.state.service.batcher.task.cancel()
        await asyncio.sleep(0)
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and "worker" in ready.json()["error"]["message"]
        await asyncio.sleep(0.2)
        assert (await client.get("/readyz")).status_code == 200
        query = jpeg(refs / "p0" / "i0" / "Image001.jpg")
        assert (await asyncio.wait_for(client.post("/localize", files=files(query)), 30)).status_code == 200


async def test_upload_is_all_or_nothing_and_latitude_in_utm_range(workspace, tiny_ckpt, monkeypatch):
    refs, index = workspace
    photo = jpeg(refs / "p0" / "i0" / "Image001.jpg")
    two = [("image", ("a.jpg", photo, "image/jpeg")), ("image", ("b.jpg", photo, "image/jpeg"))]
    async with running(settings_for(refs, index, tiny_ckpt)) as (_, client):
        polar = await client.post("/index/images", files=two[:1], data={"lat": "85", "lon": "0"})
        assert polar.status_code == 422 and "UTM" in polar.json()["error"]["message"]
        calls = {"n": 0}
        real_write = references.write_reference

        def failing_second(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise ApiError(503, "unavailable", "disk full")
            return real_write(*args, **kwargs)

        monkeypatch.setattr(references, "write_reference", failing_second)
        failed = await client.post("/index/images", files=two, data={"lat": ["1", "2"], "lon": ["3", "4"]})
        assert failed.status_code == 503
        uploads = refs / references.UPLOADS
        assert not [p for p in uploads.rglob("*") if p.is_file()] if uploads.exists() else True


async def test_public_endpoints_show_no_paths(workspace, tiny_ckpt):
    refs, index = workspace
    for shard in index.rglob("*.npy"):
        shard.write_bytes(b"damaged")  # a damaged published version
    async with running(settings_for(refs, index, tiny_ckpt, build_on_start=False)) as (_, client):
        for path in ("/readyz", "/index/status"):
            text = (await client.get(path)).text
            assert str(index) not in text and str(refs) not in text and "/tmp" not in text, text


def test_broken_and_escaping_symlinks_are_skipped_and_reported(tmp_path, shared_data, tiny_ckpt):
    refs = tmp_path / "refs"
    shutil.copytree(shared_data / "matching_triplets" / "p0", refs / "p0")
    outside = tmp_path / "outside.jpg"
    Image.new("RGB", (64, 48), "red").save(outside)
    (refs / "escape.jpg").symlink_to(outside)
    (refs / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    skipped: list[tuple[str, str]] = []
    names = {image.rel_path for image in scan_references(refs, skipped)}
    assert "escape.jpg" not in names and "broken.jpg" not in names and len(names) == 3
    assert dict(skipped) == {
        "broken.jpg": "broken symlink",
        "escape.jpg": "symlink leads outside the references folder",
    }
    report = build_index(
        BuildConfig(
            references=refs,
            index_dir=tmp_path / "index",
            model=ModelOptions(checkpoint=str(tiny_ckpt), device="cpu"),
        )
    )
    assert report.total == 3 and {f["path"] for f in report.skipped_files} == {"broken.jpg", "escape.jpg"}


async def test_rebuild_requested_during_a_build_sees_uploads(workspace, tiny_ckpt):
    refs, index = workspace
    async with running(settings_for(refs, index, tiny_ckpt)) as (_, client):
        first = await client.post("/index/rebuild")
        photo = io.BytesIO()
        Image.new("RGB", (80, 60), "blue").save(photo, format="PNG")
        upload = await client.post(
            "/index/images", params={"rebuild": "true"}, files=files(photo.getvalue(), "late.png")
        )
        assert first.json()["state"] == "running" and upload.json()["rebuild"]["state"] in (
            "queued",
            "running",
        )
        status = await wait_idle(client)
        assert status["num_images"] == 10  # the nine references and the upload made during the build


async def test_health_answers_while_the_thread_pool_is_busy(workspace, tiny_ckpt):
    refs, index = workspace
    async with running(settings_for(refs, index, tiny_ckpt)) as (_, client):
        limiter = anyio.to_thread.current_default_thread_limiter()
        tokens, limiter.total_tokens = limiter.total_tokens, 1
        release = threading.Event()
        blocker = asyncio.ensure_future(anyio.to_thread.run_sync(release.wait))  # holds the only thread
        await asyncio.sleep(0.05)
        try:
            health = await asyncio.wait_for(client.get("/healthz"), 5)
            ready = await asyncio.wait_for(client.get("/readyz"), 5)
        finally:
            release.set()
            await blocker
            limiter.total_tokens = tokens
        assert health.status_code == 200 and ready.status_code == 200
