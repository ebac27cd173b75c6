"""Abuse benchmark: what an anonymous client can cost a real `selavpr serve` process. Prints JSON.

- 4 concurrent huge PNGs (10000 x 10000, the issue's case, and 9999 x 9999, just under the inclusive
  pixel limit): answer time of each and the server's peak resident memory above idle;
- p95 of ordinary /localize requests alone, and beside 16 concurrent abusive batches at rerank_k=1000;
- body bytes a client gets to send before the 401 of an unauthenticated 400 MB upload.

    python -m bench.abuse [--checkpoint default] [--references ../shared/data/matching_triplets]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from bench.common import DEFAULT_SHARED, emit, machine

ADMIN_KEY = "bench-key"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakSampler:
    """The server's resident memory, sampled every 20 ms in a thread while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def __enter__(self) -> PeakSampler:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb(self.pid))
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()


def start_server(args: argparse.Namespace, root: Path) -> tuple[subprocess.Popen, str]:
    refs = root / "refs"
    shutil.copytree(args.references, refs)
    port = _free_port()
    env = {**os.environ, "SELAVPR_API_KEY": ADMIN_KEY}
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--references", str(refs)]
    cmd += ["--index-dir", str(root / "index"), "--checkpoint", args.checkpoint, "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited during start-up")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server was not ready in 600 s")


def one_colour_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (90, 140, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


async def huge_pngs(base: str, pid: int, side: int, count: int = 4) -> dict:
    data = one_colour_png(side)
    idle = _rss_mb(pid)

    async def one(client: httpx.AsyncClient) -> tuple[int, float]:
        start = time.perf_counter()
        response = await client.post(f"{base}/localize", files={"image": ("big.png", data)})
        return response.status_code, round(time.perf_counter() - start, 2)

    with PeakSampler(pid) as sampler:
        async with httpx.AsyncClient(timeout=300) as client:
            answers = await asyncio.gather(*(one(client) for _ in range(count)))
    return {
        "image": f"{side}x{side} PNG, one colour, {len(data):,} bytes",
        "concurrent": count,
        "statuses": [status for status, _ in answers],
        "answer_s": [seconds for _, seconds in answers],
        "idle_rss_mb": round(idle, 1),
        "peak_rss_mb": round(sampler.peak, 1),
        "peak_above_idle_mb": round(sampler.peak - idle, 1),
    }


async def ordinary_p95(base: str, photos: list[bytes], seconds: float) -> dict:
    """One client sending ordinary /localize requests back to back (default top_k / rerank_k)."""
    latencies, statuses = [], {}
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=300) as client:
        i = 0
        while time.monotonic() < end:
            start = time.perf_counter()
            response = await client.post(
                f"{base}/localize", files={"image": ("q.jpg", photos[i % len(photos)])}
            )
            latencies.append(time.perf_counter() - start)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            i += 1
    return {
        "requests": len(latencies),
        "statuses": statuses,
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 1),
        "p95_ms": round(float(np.percentile(latencies, 95)) * 1e3, 1),
    }


async def beside_abuse(base: str, photos: list[bytes], seconds: float, images_per_batch: int) -> dict:
    """Ordinary requests while 16 clients send batches at rerank_k=1000, back to back."""
    statuses: dict[int, int] = {}
    stop = asyncio.Event()

    async def abuser() -> None:
        files = [("image", ("a.jpg", photos[i % len(photos)])) for i in range(images_per_batch)]
        async with httpx.AsyncClient(timeout=300) as client:
            while not stop.is_set():
                response = await client.post(f"{base}/localize/batch", files=files, data={"rerank_k": "1000"})
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code == 503:
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")))

    abusers = [asyncio.create_task(abuser()) for _ in range(16)]
    await asyncio.sleep(2)  # let the abuse build up
    ordinary = await ordinary_p95(base, photos, seconds)
    stop.set()
    await asyncio.gather(*abusers, return_exceptions=True)
    return {"ordinary": ordinary, "abusive_batch_statuses": statuses, "images_per_batch": images_per_batch}


def bytes_sent_before_the_answer(base: str, path: str, declared: int, headers: str = "") -> tuple[int, bytes]:
    """Stream a body of `declared` bytes over a raw socket, 64 KiB at a time, stopping as soon as an
    answer arrives: (bytes of body sent by then, the status line). A small send buffer keeps what the
    kernel holds for the server small, so bytes sent bound the bytes the server read."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {declared}\r\n"
            f"Content-Type: multipart/form-data; boundary=b\r\n{headers}\r\n"
        )
        sock.sendall(head.encode())
        chunk, sent = b"\0" * 65536, 0
        while sent < declared:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                break
            if writable:
                try:
                    sent += sock.send(chunk[: declared - sent])
                except (BrokenPipeError, ConnectionResetError):
                    break
        return sent, sock.recv(65536).split(b"\r\n", 1)[0]


def bytes_before_401(base: str, declared: int = 400 * 2**20) -> dict:
    sent, status = bytes_sent_before_the_answer(base, "/index/images", declared)
    return {"declared_bytes": declared, "body_bytes_sent_before_answer": sent, "status_line": status.decode()}


async def run(args: argparse.Namespace) -> dict:
    photos = [p.read_bytes() for p in sorted(Path(args.references).rglob("*.jpg"))[:8]]
    with tempfile.TemporaryDirectory(prefix="abuse-") as tmp:
        proc, base = start_server(args, Path(tmp))
        try:
            index = httpx.get(f"{base}/index/status", timeout=10).json()
            report: dict = {"index_images": index["num_images"]}
            report["bytes_before_401"] = bytes_before_401(base)
            report["huge_png_at_limit"] = await huge_pngs(base, proc.pid, 10000)
            report["huge_png_under_limit"] = await huge_pngs(base, proc.pid, 9999)
            report["ordinary_idle"] = await ordinary_p95(base, photos, args.seconds)
            # a batch of 2 at rerank_k=1000 is the most one request may ask (max_candidates_per_request
            # 2000); the 16 images at rerank_k=1000 is refused with 422
            report["beside_16_abusive_batches"] = await beside_abuse(base, photos, args.seconds, 2)
            report["refused_16x1000"] = await beside_abuse(base, photos, args.seconds, 16)
            idle, busy = (
                report["ordinary_idle"]["p95_ms"],
                report["beside_16_abusive_batches"]["ordinary"]["p95_ms"],
            )
            report["p95_ratio_beside_abuse"] = round(busy / idle, 2)
            report["server_alive"] = proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--references", type=Path, default=DEFAULT_SHARED / "matching_triplets")
    parser.add_argument("--seconds", type=float, default=20.0, help="per ordinary-traffic measurement")
    parser.add_argument("--out", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = asyncio.run(run(args))
    report["machine"] = machine(torch.device("cpu"))
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
