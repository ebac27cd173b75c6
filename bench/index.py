"""Benchmarks of the reference index. Each part prints measured numbers; the whole run is one JSON document.

- throughput: the model's raw batched throughput on preprocessed tensors, then a full `build_index` over
  the same images, in one process run.
- storage: stored local features (int8 with per-position scales, float16) against float32 on the shared
  real images: bytes per image, count deviation, and whether the re-ranked top-1 stays.
- memory: a synthetic store of N images' 61x61x128 features (default 20,000); a serving process's resident
  memory after queries against it, against an empty store, and the size of the global index.
- ann: recall of the HNSW and IVF-PQ global indexes against exact search.

    python -m bench.index [--parts throughput,storage,ann,memory] [--memory-images 20000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import DEFAULT_SHARED, emit, machine, untrained_head_checkpoint
from index_builder.builder import BuildConfig, build_index, encoding_identity
from index_builder.global_index import GlobalIndexConfig, build_global_index, search
from index_builder.manifest import CheckpointRecord, IndexManifest
from index_builder.store import (
    SEGMENTS,
    ImageRecord,
    SegmentImage,
    decode_local,
    encode_local,
    now_iso,
    publish_version,
    read_segment_meta,
    write_segment,
)
from model.extractor import FeatureExtractor
from model.matching import mnn_scores, rerank_order

PARTS = ("throughput", "storage", "ann", "memory")


def log(message: str) -> None:
    print(f"[bench index] {message}", file=sys.stderr, flush=True)


# --- throughput --------------------------------------------------------------------------------------


def variant_images(shared: Path, out: Path, copies: int) -> list[Path]:
    """Distinct files of realistic content: each shared photo cropped by a few pixels, saved as JPEG."""
    paths = sorted((shared / "matching_triplets").glob("p*/i*/*.jpg")) + sorted(
        (shared / "tokyo_pair").glob("*")
    )
    made = []
    for c in range(copies):
        for i, path in enumerate(paths):
            image = Image.open(path).convert("RGB")
            target = out / f"c{c}" / f"{i:03d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.crop((c, c, image.width - c, image.height - c)).save(target, quality=92)
            made.append(target)
    return made


def bench_throughput(
    shared: Path,
    copies: int,
    batch_size: int,
    checkpoint: str,
    device: str = "cpu",
    model_dtype: str = "float32",
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = variant_images(shared, tmp / "refs", copies)
        extractor = FeatureExtractor.from_checkpoint(checkpoint, device, model_dtype=model_dtype)
        tensors = [extractor.preprocessing.load(p) for p in images]
        extractor.extract_tensors(torch.stack(tensors[:batch_size]))  # warm-up
        start = time.perf_counter()
        for b in range(0, len(tensors), batch_size):
            extractor.extract_tensors(torch.stack(tensors[b : b + batch_size]))
        if extractor.device.type == "cuda":
            torch.cuda.synchronize(extractor.device)  # the forwards above only queued work
        raw_seconds = time.perf_counter() - start
        del tensors
        config = BuildConfig(references=tmp / "refs", index_dir=tmp / "index", batch_size=batch_size)
        report = build_index(config, extractor=extractor)
    n = len(images)
    return {
        "images": n,
        "batch_size": batch_size,
        "device": str(extractor.device),
        "model_dtype": str(extractor.model_dtype),
        "checkpoint": extractor.info.description,
        "raw_model_images_per_s": n / raw_seconds,
        "build_images_per_s": n / report.seconds,
        "build_encode_phase_images_per_s": n / report.encode_seconds,
        "build_vs_raw": (n / report.seconds) / (n / raw_seconds),
        "build_seconds": report.seconds,
    }


# --- storage -----------------------------------------------------------------------------------------


def bench_storage(shared: Path, work: Path) -> list[dict]:
    paths = sorted((shared / "matching_triplets").glob("p*/i*/*.jpg")) + sorted(
        (shared / "tokyo_pair").glob("*")
    )
    maps = {
        "16x16x384 patch tokens": FeatureExtractor.from_checkpoint("default", "cpu").embed(paths).local,
        "61x61x128 (untrained head)": FeatureExtractor.from_checkpoint(
            str(untrained_head_checkpoint(work / "head")), "cpu"
        )
        .embed(paths)
        .local,
    }
    rows = []
    for name, local in maps.items():
        exact = [mnn_scores(local[q], np.delete(local, q, axis=0), "float32") for q in range(len(local))]
        for dtype in ("int8", "float16"):
            stored = encode_local(local, dtype)
            decoded = decode_local(stored["local"], stored.get("scale"))
            changed, deviation = [], []
            for q in range(len(local)):
                counts = mnn_scores(local[q], np.delete(decoded, q, axis=0))  # default precision
                deviation.append(float((counts - exact[q]).abs().float().mean()))
                if rerank_order(counts)[0] != rerank_order(exact[q])[0]:
                    top = rerank_order(exact[q])[:2]
                    changed.append({"query": paths[q].name, "float32_top2_counts": exact[q][top].tolist()})
            rows.append(
                {
                    "maps": name,
                    "dtype": dtype,
                    "bytes_per_image": int(sum(a[0].nbytes for a in stored.values())),
                    "mib_per_image": sum(a[0].nbytes for a in stored.values()) / 2**20,
                    "float32_mib_per_image": local[0].nbytes / 2**20,
                    "queries": len(local),
                    "top1_unchanged": len(local) - len(changed),
                    "changed": changed,
                    "mean_abs_count_deviation": statistics.mean(deviation),
                }
            )
        log(f"storage {name} done")
    return rows


# --- approximate global search -----------------------------------------------------------------------


def bench_ann(n: int = 50_000, dim: int = 384, queries: int = 500) -> list[dict]:
    """Places seen about five times each (cosine ~0.8 between views of a place, ~0 across places);
    each query is a noisy view of a database image (cosine ~0.96 to it)."""
    rng = np.random.default_rng(0)

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    centres = unit(rng.standard_normal((n // 5, dim)))
    data = unit(centres[rng.integers(0, len(centres), n)] + 0.5 * unit(rng.standard_normal((n, dim))))
    q = unit(data[rng.integers(0, n, queries)] + 0.3 * unit(rng.standard_normal((queries, dim))))
    rows, exact = [], None
    for kind in ("flat", "hnsw", "ivfpq"):
        start = time.perf_counter()
        index = build_global_index(data, GlobalIndexConfig(kind=kind))
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        _, ids = search(index, q, 100)
        search_ms = (time.perf_counter() - start) / queries * 1e3
        if exact is None:
            exact = ids
        rows.append(
            {
                "kind": kind,
                "database": n,
                "dim": dim,
                "build_s": build_s,
                "search_ms_per_query": search_ms,
                "recall_1_at_1": float(np.mean(ids[:, 0] == exact[:, 0])),
                "recall_1_at_100": float(np.mean([exact[i, 0] in ids[i] for i in range(queries)])),
                "recall_100_at_100": float(
                    np.mean([len(set(exact[i]) & set(ids[i])) / 100 for i in range(queries)])
                ),
            }
        )
    return rows


# --- serving memory ----------------------------------------------------------------------------------


def synthetic_store(index_dir: Path, checkpoint: Path, images: int, segment_size: int = 256) -> None:
    """A published version of `images` random 61x61x128 feature maps (int8 as the builder stores them),
    with the identity of `checkpoint` so that a Localizer accepts it."""
    extractor = FeatureExtractor.from_checkpoint(str(checkpoint), "cpu")
    identity = encoding_identity(extractor, "int8")
    rng = np.random.default_rng(0)
    block = rng.standard_normal((segment_size, *identity.local_shape)).astype(np.float32)
    block /= np.linalg.norm(block, axis=-1, keepdims=True)
    encoded = encode_local(block, "int8")
    records, descriptors, names = [], [], []
    (index_dir / SEGMENTS).mkdir(parents=True, exist_ok=True)
    for start in range(0, images, segment_size):
        count = min(segment_size, images - start)
        glob = rng.standard_normal((count, identity.global_dim)).astype(np.float32)
        glob /= np.linalg.norm(glob, axis=1, keepdims=True)
        metas = [SegmentImage(f"synthetic-{start + i}", 640, 480, None) for i in range(count)]
        arrays = {"global": glob, **{k: v[:count] for k, v in encoded.items()}}
        name = write_segment(index_dir / SEGMENTS, identity, metas, arrays)
        names.append(name)
        descriptors.append(glob)
        for i in range(count):
            records.append(
                ImageRecord(
                    id=len(records),
                    path=f"synthetic/{start + i:06d}.jpg",
                    content_hash=metas[i].content_hash,
                    file_size=0,
                    mtime_ns=0,
                    width=640,
                    height=480,
                    lat=None,
                    lon=None,
                    utm_east=None,
                    utm_north=None,
                    utm_zone=None,
                    location_source=None,
                    exif_location=None,
                    added_at=now_iso(),
                    segment=name,
                    row=i,
                )
            )
    descriptors = (
        np.concatenate(descriptors) if descriptors else np.zeros((0, identity.global_dim), np.float32)
    )
    manifest = IndexManifest(
        encoding=identity,
        checkpoint=CheckpointRecord(
            spec=str(checkpoint),
            source=str(checkpoint),
            description=extractor.info.description,
            fingerprint=extractor.info.fingerprint,
        ),
        references="synthetic",
        count=len(records),
        global_index=GlobalIndexConfig(),
        # The segments' entries carry their files' checksums.
        segments=[read_segment_meta(index_dir / SEGMENTS / name).entry(name) for name in names],
    )
    publish_version(index_dir, records, build_global_index(descriptors, GlobalIndexConfig()), manifest)


SERVE_PROBE = """
import json, sys, numpy as np
from pathlib import Path
from index_builder.search import Localizer
def status(field):
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024
index_dir, queries = sys.argv[1], [Path(p) for p in sys.argv[2:]]
localizer = Localizer.open(index_dir, device='cpu')
for p in queries[:2]:
    localizer.localize(p, rerank_k=100)
after_warmup = status('VmRSS')
for _ in range(3):
    for p in queries:
        localizer.localize(p, rerank_k=100)
print(json.dumps({'rss_after_warmup': after_warmup, 'rss_after_queries': status('VmRSS'),
                  'peak_rss': status('VmHWM'), 'images': len(localizer.index),
                  'global_index_bytes': localizer.index.index.ntotal * localizer.index.index.d * 4}))
"""


def serve_memory(index_dir: Path, queries: list[Path]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SERVE_PROBE, str(index_dir), *map(str, queries)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_memory(shared: Path, work: Path, images: int) -> dict:
    checkpoint = untrained_head_checkpoint(work / "head")
    queries = sorted((shared / "matching_triplets").glob("p*/i0/*.jpg"))
    synthetic_store(work / "empty", checkpoint, 0)
    start = time.perf_counter()
    synthetic_store(work / "full", checkpoint, images)
    log(f"synthetic store of {images} images written in {time.perf_counter() - start:.0f} s")
    empty, full = serve_memory(work / "empty", queries), serve_memory(work / "full", queries)
    allowance = 1.2 * (empty["rss_after_queries"] + full["global_index_bytes"])
    mib = 2**20
    return {
        "images": images,
        "store_bytes_on_disk": sum(f.stat().st_size for f in (work / "full" / SEGMENTS).rglob("*.npy")),
        "queries": 3 * len(queries),
        "rerank_k": 100,
        "empty_store_rss_mib": empty["rss_after_queries"] / mib,
        "full_store_rss_mib": full["rss_after_queries"] / mib,
        "full_store_peak_rss_mib": full["peak_rss"] / mib,
        "empty_store_peak_rss_mib": empty["peak_rss"] / mib,
        "global_index_mib": full["global_index_bytes"] / mib,
        "target_mib": allowance / mib,
        "within_target": full["rss_after_queries"] <= allowance,
    }


# --- entry point -------------------------------------------------------------------------------------


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="python -m bench.index", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--parts", default="throughput,storage,ann", help=f"any of {','.join(PARTS)}")
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--copies", type=int, default=4, help="throughput: variants of each shared image")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--checkpoint", default="default", help="throughput: the model to build with")
    parser.add_argument("--device", default="cpu", help="throughput: where the model runs")
    parser.add_argument("--model-dtype", default="float32", help="throughput: the forward's dtype")
    parser.add_argument("--memory-images", type=int, default=20_000)
    parser.add_argument("--work-dir", type=Path, help="scratch space (default: a temporary directory)")
    parser.add_argument("--out", type=Path)
    return parser


def run(args: argparse.Namespace) -> dict:
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; expected {PARTS}")
    report: dict = {"machine": machine(torch.device("cpu"))}
    work = Path(tempfile.mkdtemp(dir=args.work_dir))
    try:
        if "throughput" in parts:
            report["throughput"] = bench_throughput(
                args.shared_data, args.copies, args.batch_size, args.checkpoint, args.device, args.model_dtype
            )
            log("throughput done")
        if "storage" in parts:
            report["storage"] = bench_storage(args.shared_data, work)
        if "ann" in parts:
            report["ann"] = bench_ann()
            log("ann done")
        if "memory" in parts:
            report["memory"] = bench_memory(args.shared_data, work, args.memory_images)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(report, args.out)
    return report


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
