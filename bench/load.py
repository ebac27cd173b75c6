"""Load test of a running server: N concurrent clients POST /localize for T seconds (loopback only).

Reports throughput, client latency and the server's per-stage latency (p50/p95/p99), errors by status,
the share of latency outside the model forward and re-ranking, and the server's resident memory over
the run (from /metrics). Optionally triggers one rebuild part-way through.

    python -m bench.load --url http://127.0.0.1:8000 --clients 4 --seconds 60 [--rebuild-at 30 --api-key K]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

from bench.common import DEFAULT_SHARED, emit

MAX_CLIENTS, MAX_SECONDS = 64, 3600
STAGES = ("decode", "extract", "search", "rerank", "total")


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"refusing {url}: the load test only targets loopback addresses")


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2)}


async def resident_memory(client: httpx.AsyncClient) -> float | None:
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1]) / 2**20
    return None


async def run(args: argparse.Namespace) -> dict:
    images = [p.read_bytes() for p in args.images]
    latencies: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    statuses: Counter[int] = Counter()
    versions: Counter[str] = Counter()
    memory: list[tuple[float, float]] = []
    start = time.monotonic()
    stop_at = start + args.seconds
    params = {"top_k": args.top_k, "rerank_k": args.rerank_k}
    async with httpx.AsyncClient(base_url=args.url, timeout=120) as client:

        async def worker(offset: int) -> None:
            i = offset
            while time.monotonic() < stop_at:
                data = images[i % len(images)]
                i += args.clients
                sent = time.perf_counter()
                try:
                    response = await client.post("/localize", files={"image": ("q.jpg", data)}, params=params)
                except httpx.HTTPError:
                    statuses[-1] += 1
                    continue
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    latencies.append((time.perf_counter() - sent) * 1e3)
                    body = response.json()
                    versions[body["index_version"]] += 1
                    for stage in STAGES:
                        stages[stage].append(body["timings_ms"][stage])

        async def sampler() -> None:
            while time.monotonic() < stop_at:
                memory.append((round(time.monotonic() - start, 1), await resident_memory(client)))
                await asyncio.sleep(args.memory_every)
            memory.append((round(time.monotonic() - start, 1), await resident_memory(client)))

        async def rebuilder() -> dict | None:
            if args.rebuild_at is None:
                return None
            await asyncio.sleep(args.rebuild_at)
            headers = {"X-API-Key": args.api_key} if args.api_key else {}
            job = (await client.post("/index/rebuild", headers=headers)).json()
            while (status := (await client.get("/index/status")).json())["state"] == "running":
                await asyncio.sleep(0.5)
            return {"requested_at_s": args.rebuild_at, "job": job, "finished": status}

        results = await asyncio.gather(*(worker(c) for c in range(args.clients)), sampler(), rebuilder())
    elapsed = time.monotonic() - start
    outside = [lat - e - r for lat, e, r in zip(latencies, stages["extract"], stages["rerank"], strict=True)]
    p50 = float(np.percentile(latencies, 50)) if latencies else None
    rss = [m for _, m in memory if m is not None]
    return {
        "url": args.url,
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "requests_ok": len(latencies),
        "errors": {str(code): n for code, n in statuses.items() if code != 200},
        "throughput_per_s": round(len(latencies) / elapsed, 3),
        "latency_ms": percentiles(latencies),
        "server_stage_ms": {stage: percentiles(values) for stage, values in stages.items()},
        "outside_forward_and_rerank_ms": percentiles(outside),
        "outside_share_of_p50": round(float(np.percentile(outside, 50)) / p50, 4) if p50 else None,
        "index_versions_served": dict(versions),
        "rss_mib": {
            "samples": memory,
            "first": rss[0] if rss else None,
            "last": rss[-1] if rss else None,
            "max": max(rss) if rss else None,
        },
        "rebuild": results[-1],
    }


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--images", type=Path, nargs="*", help="query images (default: the shared triplets)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--rerank-k", type=int, default=100)
    parser.add_argument("--rebuild-at", type=float, help="seconds into the run to POST /index/rebuild")
    parser.add_argument("--api-key", help="for the rebuild")
    parser.add_argument("--memory-every", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--out", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return execute(args)


def execute(args: argparse.Namespace) -> int:
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.seconds <= MAX_SECONDS:
        raise SystemExit(f"clients must be 1..{MAX_CLIENTS} and seconds 0..{MAX_SECONDS}")
    require_loopback(args.url)
    args.images = args.images or sorted((DEFAULT_SHARED / "matching_triplets").glob("p*/i*/*.jpg"))
    emit(asyncio.run(run(args)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
