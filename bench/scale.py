"""A city in simulation: a synthetic index of --images references over --shards location shards, served
by the Ray engine's shard deployments on a local cluster, queried through the Ray router
(app/ray_engine/remote_search.py). Prints JSON: per-shard memory and start-up time, query latency
(p50/p95, by stage), and the bytes that travel between the router and the shards per query (measured:
every call's arguments and reply, pickled as Ray ships them; the query map in --precision).

Synthetic: random unit global descriptors (the real exact search over them); every reference's local map
is one of a small pool (--pool) written once, so that 1 M references do not need 476 GB of disk (each
candidate's map is still read from disk and matched). Location shards are contiguous id ranges.

Run it where nothing can leave the machine, as the tests do:

    unshare -n sh -c 'ip link set lo up && .venv/bin/python -m bench.scale --images 1000000 --shards 4'
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from bench.common import machine
from index_builder.global_index import GlobalIndexConfig
from index_builder.manifest import CheckpointRecord, EncodingIdentity, IndexManifest
from index_builder.sharding import BoundingBox, ShardPlan, shard_key
from index_builder.store import (
    SEGMENTS,
    ImageRecord,
    IndexVersion,
    SegmentImage,
    encode_local,
    read_segment_meta,
    segment_dir,
    write_segment,
)
from index_builder.store.location_shards import ids_file, index_file, rows_file
from index_builder.store.metadata import write_metadata
from index_builder.store.versions import CURRENT, VERSIONS

CITY_LAT, CITY_LON = 35.68, 139.76  # references spread over a 0.2 x 0.2 degree box (Tokyo)


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def write_synthetic_index(
    root: Path, images: int, shards: int, dim: int, map_shape, pool: int, layout: str = "own"
) -> dict:
    """A published version with `images` references in `shards` location shards; returns what it cost.
    layout "own": each shard's maps in a segment of its own, with its own id table (shard-NN.rows.npy),
    as builds write them now; "shared": one segment for all and no id tables, as builds wrote them
    before shards owned their files (a shard's server then reads its rows of meta.sqlite)."""
    started = time.monotonic()
    rng = np.random.default_rng(0)
    identity = EncodingIdentity(
        fingerprint="synthetic",
        local_mode="local_head",
        image_size=224,
        exif_transpose=True,
        local_dtype="int8",
        global_dim=dim,
        local_shape=tuple(map_shape),
        feature_block="final",
    )
    maps = torch.nn.functional.normalize(torch.randn(pool, *map_shape), dim=-1).numpy()
    pool_arrays = {"global": _unit(rng, pool, dim), **encode_local(maps, "int8")}
    pool_images = [SegmentImage(f"pool{i}", 224, 224, None) for i in range(pool)]
    segments = [
        write_segment(root / SEGMENTS, identity, pool_images, pool_arrays)
        for _ in range(shards if layout == "own" else 1)
    ]
    version_dir = root / VERSIONS / "v000001"
    version_dir.mkdir(parents=True)
    lats = CITY_LAT + rng.uniform(0, 0.2, images)
    lons = CITY_LON + rng.uniform(0, 0.2, images)
    bounds = np.linspace(0, images, shards + 1).astype(int)
    shard_of = np.repeat(np.arange(shards), np.diff(bounds))  # location shards: contiguous id ranges
    segment_of = shard_of if layout == "own" else np.zeros(images, dtype=np.int64)
    write_metadata(
        version_dir / "meta.sqlite",
        (
            ImageRecord(
                id=i,
                path=f"synthetic/{i:07d}.jpg",
                content_hash=f"{i:064x}",
                file_size=0,
                mtime_ns=0,
                width=224,
                height=224,
                lat=float(lats[i]),
                lon=float(lons[i]),
                utm_east=None,
                utm_north=None,
                utm_zone=None,
                location_source="synthetic",
                exif_location=None,
                added_at="",
                segment=segments[segment_of[i]],
                row=i % pool,
            )
            for i in range(images)
        ),
    )
    plans = []
    for k in range(shards):
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        index = faiss.IndexFlatIP(dim)
        for start in range(lo, hi, 100_000):
            index.add(_unit(rng, min(100_000, hi - start), dim))
        faiss.write_index(index, str(version_dir / index_file(shard_key(k))))
        ids = np.arange(lo, hi, dtype=np.int64)
        np.save(version_dir / ids_file(shard_key(k)), ids)
        own: tuple[str, ...] = ()
        if layout == "own":
            own = (segments[k],)
            table = np.stack([np.zeros_like(ids), ids % pool], axis=1)  # (segment position, row)
            np.save(version_dir / rows_file(shard_key(k)), table)
        box = BoundingBox(
            float(lats[lo:hi].min()),
            float(lats[lo:hi].max()),
            float(lons[lo:hi].min()),
            float(lons[lo:hi].max()),
        )
        plans.append(ShardPlan(shard_key(k), k, k + 1, hi - lo, hi - lo, box, own))  # ranges: ids, not cells
    manifest = IndexManifest(
        encoding=identity,
        checkpoint=CheckpointRecord("synthetic", "synthetic", "synthetic descriptors", "synthetic"),
        references="synthetic",
        count=images,
        global_index=GlobalIndexConfig(),
        segments=[read_segment_meta(segment_dir(root, s)).entry(s) for s in segments],
        location_shards=plans,
        version="v000001",
    )
    manifest.write(version_dir / "manifest.json")
    (root / CURRENT).write_text("v000001\n")
    disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {"write_s": round(time.monotonic() - started, 1), "disk_bytes": disk, "layout": layout}


def open_one_shard(index_dir: Path, version: str, position: int) -> float:
    """Seconds to open one location shard as its server does (ShardSearcher.open_alone), and to count one
    candidate (its first reference) so that reading a map is part of it."""
    from index_builder.shard_search import ShardSearcher
    from model.matching.precision import Precision

    started = time.perf_counter()
    searcher = ShardSearcher.open_alone(index_dir, version, position)
    query = torch.from_numpy(searcher.version.read_local(searcher.ids[:1].tolist())[0])
    searcher.counts(query, searcher.ids[:1].tolist(), Precision.FLOAT32)
    return time.perf_counter() - started


def shard_opening(index_dir: Path, version: str, position: int) -> dict:
    """One shard opened outside Ray, in a fresh process: how long it takes (imports not counted), and
    which files of the index it opens (every successful open(2) of the process, traced with strace) and
    their bytes."""
    child = [
        sys.executable,
        "-c",
        "import sys; from pathlib import Path; from bench.scale import open_one_shard; "
        "print(open_one_shard(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))",
        str(index_dir),
        version,
        str(position),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    seconds = float(subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout)
    trace = index_dir.parent / f"{index_dir.name}.strace"
    traced = ["strace", "-f", "-qq", "-e", "trace=open,openat", "-o", str(trace), *child]
    subprocess.run(traced, env=env, check=True, capture_output=True, text=True)
    opened = sorted(_opened_files(trace.read_text(), index_dir))
    trace.unlink()
    sizes = {path: (index_dir / path).stat().st_size for path in opened}
    return {"open_s": round(seconds, 2), "files": sizes, "bytes": sum(sizes.values())}


def _opened_files(trace: str, index_dir: Path) -> set[str]:
    """Paths under index_dir (relative) that a traced process opened successfully."""
    prefix = f'"{index_dir.resolve()}/'
    opened = set()
    for line in trace.splitlines():
        if prefix not in line or "= -1" in line:
            continue
        path = line.split(prefix, 1)[1].split('"', 1)[0]
        if (index_dir / path).is_file():
            opened.add(path)
    return opened


class _Response:
    def __init__(self, value) -> None:
        self.value = value

    def result(self, timeout_s: float | None = None):
        return self.value

    def cancel(self) -> None:
        pass


class _FixedEncoder:
    """Stands in for the encoder deployment: the queries' features are given (no images here)."""

    def __init__(self, features: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        self.features, self.encode = features, self

    def remote(self, tensor: np.ndarray) -> _Response:
        return _Response(self.features[int(tensor.flat[0])])


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class _Meter:
    """Bytes of the calls' arguments and replies, pickled (protocol 5) as Ray ships them."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sent = self.received = 0
        self.query_maps: list[int] = []  # bytes of each query map sent with a counts call


class _MeteredResponse:
    def __init__(self, response, meter: _Meter) -> None:
        self.response, self.meter = response, meter

    def result(self, timeout_s: float | None = None):
        value = self.response.result(timeout_s=timeout_s)
        self.meter.received += len(pickle.dumps(value, protocol=5))
        return value

    def cancel(self) -> None:
        self.response.cancel()


class _MeteredMethod:
    def __init__(self, name: str, method, meter: _Meter) -> None:
        self.name, self.method, self.meter = name, method, meter

    def remote(self, *args):
        self.meter.sent += len(pickle.dumps(args, protocol=5))
        if self.name == "counts":
            self.meter.query_maps.append(args[0].nbytes)
        return _MeteredResponse(self.method.remote(*args), self.meter)


class _MeteredHandle:
    """A shard deployment's handle whose calls are metered."""

    def __init__(self, handle, meter: _Meter) -> None:
        self.handle, self.meter = handle, meter

    def __getattr__(self, name: str) -> _MeteredMethod:
        return _MeteredMethod(name, getattr(self.handle, name), self.meter)


def _bytes_per_query(meters: list[_Meter], rerank_k: int, map_shape, owners: int) -> dict:
    """What the router sent to and received from the shards per query (measured), against the candidate
    maps that stayed on the shards."""
    sent = [m.sent for m in meters]
    received = [m.received for m in meters]
    candidate_maps = rerank_k * int(np.prod(map_shape)) * (1 + 2 / map_shape[-1])  # int8 + float16 scales
    return {
        "sent": int(np.mean(sent)),
        "received": int(np.mean(received)),
        "total": int(np.mean(sent) + np.mean(received)),
        "counts_calls": round(float(np.mean([len(m.query_maps) for m in meters])), 2),
        "query_map_bytes": sorted({b for m in meters for b in m.query_maps}),
        "float32_query_map_bytes": int(np.prod(map_shape)) * 4,
        "shards_asked_for_counts": owners,
        "candidate_maps_not_moved": int(candidate_maps),
    }


def run(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from app.metrics import Metrics
    from app.ray_engine.deployments import ShardServer
    from app.ray_engine.remote_search import CallPolicy, RemoteLocalizer
    from model.matching.precision import Precision

    map_shape = tuple(int(x) for x in args.map.split(","))
    work = Path(tempfile.mkdtemp(prefix="selavpr-scale-", dir=args.work_dir))
    report: dict = {
        "machine": machine(torch.device("cpu")),
        "load_average_before": os.getloadavg(),
        "images": args.images,
        "shards": args.shards,
        "dim": args.dim,
        "map_shape": map_shape,
        "pool": args.pool,
        "rerank_k": args.rerank_k,
        "queries": args.queries,
    }
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        report["index"] = write_synthetic_index(
            work, args.images, args.shards, args.dim, map_shape, args.pool, args.layout
        )
        report["shard_opening"] = shard_opening(work, "v000001", 0)
        if args.opening_only:
            return report
        started = time.monotonic()
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 * 2**20,
            _node_ip_address="127.0.0.1",
            logging_level="WARNING",
        )
        version = "v000001"
        report["cluster_start_s"] = round(time.monotonic() - started, 1)
        handles, shard_start_s = [], []
        for k in range(args.shards):
            shard_started = time.monotonic()
            bound = ShardServer.options(name=shard_key(k), ray_actor_options={"num_cpus": 0}).bind(
                str(work), version, k, None
            )
            handles.append(serve.run(bound, name=shard_key(k), route_prefix=None))
            shard_start_s.append(round(time.monotonic() - shard_started, 1))
        report["deploy_s"] = round(time.monotonic() - started, 1)
        report["shard_start_s"] = shard_start_s  # deployment created -> its replica serving, each
        pids = [h.ping.remote().result(timeout_s=60) for h in handles]
        rng = np.random.default_rng(1)
        pool_maps = IndexVersion(work, version, load_global=False).read_local(list(range(args.pool)))
        features = {q: (_unit(rng, 1, args.dim)[0], pool_maps[q % args.pool]) for q in range(args.queries)}
        index = IndexVersion(work, version, load_global=False)
        meter = _Meter()
        router = RemoteLocalizer(
            index,
            _FixedEncoder(features),
            [_MeteredHandle(h, meter) for h in handles],
            Precision(args.precision),
            Metrics(),
            CallPolicy(timeout_s=120),
        )
        latencies, search, rerank, meters = [], [], [], []
        for q in range(args.queries):
            tensor = torch.full((1, 3, 2, 2), float(q))
            t0 = time.perf_counter()
            meter.reset()
            (result,) = router.run(tensor, [args.top_k], [args.rerank_k], [None])
            latencies.append(time.perf_counter() - t0)
            meters.append(copy.copy(meter))
            search.append(result.timings_ms.search / 1e3)
            rerank.append(result.timings_ms.rerank / 1e3)
            assert not result.partial and len(result.matches) == args.top_k
        # which shards the candidates of a query came from (random descriptors: spread over all)
        tops = [
            h.top.remote(features[0][0][None], args.rerank_k, version).result(timeout_s=120).value[0]
            for h in handles
        ]
        merged = sorted(
            (s, i, k) for k, (scores, ids) in enumerate(tops) for s, i in zip(-scores, ids, strict=True)
        )
        owners = len({k for _, _, k in merged[: args.rerank_k]})

        def stats(values: list[float]) -> dict:
            return {
                "p50_s": round(float(np.percentile(values, 50)), 4),
                "p95_s": round(float(np.percentile(values, 95)), 4),
            }

        report["latency"] = {
            "total": stats(latencies),
            "global_search": stats(search),
            "rerank": stats(rerank),
        }
        report["per_shard"] = [
            {
                "shard": shard_key(k),
                "references": plan.count,
                "global_index_bytes": plan.count * args.dim * 4,
                "replica_rss_bytes": _rss_bytes(pid),
            }
            for k, (plan, pid) in enumerate(zip(index.manifest.location_shards, pids, strict=True))
        ]
        report["bytes_per_query"] = _bytes_per_query(meters, args.rerank_k, map_shape, owners)
        report["load_average_after"] = os.getloadavg()
        index.close()
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument(
        "--dim", type=int, default=384, help="global descriptor length (ViT-S 384, ViT-L 1024)"
    )
    parser.add_argument("--map", default="61,61,128", help="local map shape h,w,C (the authors' 61x61x128)")
    parser.add_argument("--pool", type=int, default=64, help="distinct local maps on disk")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--rerank-k", type=int, default=100)
    parser.add_argument(
        "--precision", default="float32", help="of the counts: the query map travels to the shards in it"
    )
    parser.add_argument(
        "--work-dir", default=None, help="where the synthetic index is written (removed after)"
    )
    parser.add_argument(
        "--layout",
        choices=("own", "shared"),
        default="own",
        help="own: each shard its own segment and id table (builds now); shared: one segment and the "
        "version's id map for all (versions built before shards owned their files)",
    )
    parser.add_argument(
        "--opening-only", action="store_true", help="measure opening one shard outside Ray, then stop"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
