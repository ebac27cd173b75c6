"""One real `selavpr serve` process on a free loopback port: the entry point the Docker images run."""

from __future__ import annotations

import asyncio
import shutil
import signal

import httpx
import pytest

from tests.helpers import tiny_checkpoint
from tests.servers import serve_args, serve_process


def load_test(base: str, refs) -> dict:
    from bench import load

    args = load.build_parser().parse_args(
        ["--url", base, "--clients", "2", "--seconds", "2", "--memory-every", "1"]
    )
    args.images = sorted(refs.rglob("*.jpg"))
    return asyncio.run(load.run(args))


def test_load_bench_refuses_remote_hosts():
    from bench import load

    with pytest.raises(SystemExit, match="loopback"):
        load.require_loopback("http://192.0.2.1:8000")
    load.require_loopback("http://localhost:8000")


def test_serve_builds_serves_and_stops(tmp_path, shared_data):
    refs = tmp_path / "refs"
    shutil.copytree(shared_data / "matching_triplets" / "p0", refs / "p0")
    ckpt = tiny_checkpoint(tmp_path / "tiny")
    args = serve_args(refs, tmp_path / "index", ckpt)
    with serve_process(args, {"SELAVPR_API_KEY": "k"}) as (base, proc):
        image = next((refs / "p0" / "i1").iterdir())
        response = httpx.post(f"{base}/localize", files={"image": ("q.jpg", image.read_bytes())}, timeout=30)
        assert response.status_code == 200
        assert response.json()["matches"][0]["path"] == image.relative_to(refs).as_posix()
        assert httpx.post(f"{base}/index/rebuild", timeout=5).status_code == 401  # key from the environment
        assert httpx.get(f"{base}/metrics", timeout=5).text.count("selavpr_requests_total") > 0
        report = load_test(base, refs)
        assert report["errors"] == {} and report["requests_ok"] > 0
        assert set(report["server_stage_ms"]) == {"decode", "extract", "search", "rerank", "total"}
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells it was SIGTERM
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in proc.stdout.read()
