"""One real `selavpr serve` process on a free loopback port: the entry point the Docker images run."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import time

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


def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """True when the server closes the socket (EOF, or a reset) within the time; response bytes before
    the close are read and ignored."""
    sock.settimeout(within_s)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_and_slow_clients_cannot_hold_the_connections(tmp_path, shared_data):
    """uvicorn closes nothing before a request's head arrives, and counts such sockets against
    max_connections: 4 idle sockets made every other client get 503 for as long as they stayed open.
    Heads and bodies now have deadlines (app/protocol.py)."""
    refs = tmp_path / "refs"
    shutil.copytree(shared_data / "matching_triplets" / "p0", refs / "p0")
    args = serve_args(refs, tmp_path / "index", tiny_checkpoint(tmp_path / "tiny"))
    env = {"SELAVPR_MAX_CONNECTIONS": "4", "SELAVPR_HEAD_TIMEOUT_S": "1", "SELAVPR_BODY_TIMEOUT_S": "2"}
    with serve_process(args, env) as (base, _):
        host, port = base.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(3)]
        slow_head = socket.create_connection((host, int(port)))
        slow_head.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        time.sleep(0.3)
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 503  # the limit is real
        assert all(_closed_by_server(s, within_s=3) for s in [*idle, slow_head])
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        slow_body = socket.create_connection((host, int(port)))
        slow_body.sendall(
            b"POST /localize HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
        )
        started = time.monotonic()
        assert _closed_by_server(slow_body, within_s=6)
        assert time.monotonic() - started < 5
        image = next((refs / "p0" / "i1").iterdir())
        response = httpx.post(f"{base}/localize", files={"image": ("q.jpg", image.read_bytes())}, timeout=30)
        assert response.status_code == 200  # the deadlines leave ordinary requests alone
        for sock in [*idle, slow_head, slow_body]:
            sock.close()
