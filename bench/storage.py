"""Benchmarks of storage faults. Each part prints measured numbers; the whole run is one JSON document.

- verify: a synthetic store of N images' 61x61x128 int8 features (default 1,000, about 470 MiB):
  one verification pass at full speed and at the server's default rate, and /localize-path latency
  (Localizer.localize, rerank_k 100) with no verifier, with the default-rate verifier, and with an
  unthrottled one running beside the queries.
- disk_full (root only: it mounts a tmpfs): a build on a full disk, refused up front and filled
  part-way through encoding; the disk space used before and after each failure.

    python -m bench.storage [--parts verify,disk_full] [--images 1000] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.common import DEFAULT_SHARED, emit, machine, untrained_head_checkpoint
from bench.index import synthetic_store, variant_images
from index_builder.builder import BuildConfig, build_index
from index_builder.errors import IndexStoreError
from index_builder.manifest import IndexManifest
from index_builder.search import Localizer
from index_builder.store import VERSIONS, IndexVersion, current_version_name
from index_builder.store.integrity import Throttle, verify_version
from model.extractor import FeatureExtractor
from model.options import ModelOptions

PARTS = ("verify", "disk_full")
MIB = 2**20
DEFAULT_RATE = 32 * MIB  # app/settings.py verify_bytes_per_s


def log(message: str) -> None:
    print(f"[bench storage] {message}", file=sys.stderr, flush=True)


def index_bytes(index_dir: Path) -> int:
    return sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file())


def one_pass(index_dir: Path, rate: float | None) -> dict:
    manifest = IndexManifest.read(index_dir / VERSIONS / current_version_name(index_dir))
    started = time.perf_counter()
    result = verify_version(index_dir, manifest, Throttle(rate))
    seconds = time.perf_counter() - started
    return {
        "rate_limit_mib_s": rate / MIB if rate else None,
        "ok": result.ok,
        "files": result.files_checked,
        "mib": round(result.bytes_checked / MIB, 1),
        "seconds": round(seconds, 2),
        "mib_per_s": round(result.bytes_checked / MIB / seconds, 1),
    }


def latencies(localizer: Localizer, queries: list[Path], rounds: int) -> dict:
    times = []
    for _ in range(rounds):
        for q in queries:
            started = time.perf_counter()
            localizer.localize(q, top_k=10, rerank_k=100)
            times.append((time.perf_counter() - started) * 1e3)
    times.sort()
    return {
        "queries": len(times),
        "p50_ms": round(statistics.median(times), 1),
        "p95_ms": round(times[int(0.95 * (len(times) - 1))], 1),
    }


def with_verifier(index_dir: Path, rate: float | None, run):
    """`run()` while a verifier loops over the index at `rate` in a thread."""
    stop = threading.Event()
    manifest = IndexManifest.read(index_dir / VERSIONS / current_version_name(index_dir))

    def loop():
        while not stop.is_set():
            try:
                verify_version(index_dir, manifest, Throttle(rate, stop))
            except Exception:  # VerificationStopped
                return

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        return run()
    finally:
        stop.set()
        thread.join()


def bench_verify(shared: Path, work: Path, images: int, rounds: int) -> dict:
    checkpoint = untrained_head_checkpoint(work / "ckpt")
    index_dir = work / "synthetic"
    log(f"writing a synthetic store of {images} images")
    synthetic_store(index_dir, checkpoint, images)
    total = index_bytes(index_dir)
    passes = [one_pass(index_dir, None), one_pass(index_dir, DEFAULT_RATE)]
    extractor = FeatureExtractor.from_checkpoint(str(checkpoint), "cpu")
    localizer = Localizer(IndexVersion.open_current(index_dir), extractor)
    queries = sorted((shared / "matching_triplets").glob("p*/i0/*.jpg"))[:5]
    latencies(localizer, queries[:2], 1)  # warm-up
    log("query latency: no verifier, default-rate verifier, unthrottled verifier")
    return {
        "images": images,
        "index_mib": round(total / MIB, 1),
        "passes": passes,
        "latency_no_verifier": latencies(localizer, queries, rounds),
        "latency_verifier_default_rate": with_verifier(
            index_dir, DEFAULT_RATE, lambda: latencies(localizer, queries, rounds)
        ),
        "latency_verifier_unthrottled": with_verifier(
            index_dir, None, lambda: latencies(localizer, queries, rounds)
        ),
        "page_cache": "warm (the store was just written): a pass measures hashing more than the disk",
    }


def used_bytes(root: Path) -> int:
    stat = os.statvfs(root)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def fill(root: Path, leave: int) -> Path:
    ballast = root / ".ballast"
    with open(ballast, "ab") as f:
        try:
            while True:
                f.write(b"\0" * MIB)
                f.flush()
        except OSError:
            pass
    os.truncate(ballast, max(0, ballast.stat().st_size - leave))
    return ballast


class FillWhileEncoding:
    """A build's progress callback that fills the disk once the first images are encoded."""

    def __init__(self, root: Path) -> None:
        self.root, self.filled = root, False

    def __call__(self, progress) -> None:
        if progress.phase == "encoding" and progress.done and not self.filled:
            self.filled = True
            fill(self.root, 0)


def bench_disk_full(shared: Path, work: Path) -> dict:
    if os.geteuid() != 0:
        return {"skipped": "needs root to mount a tmpfs"}
    checkpoint = untrained_head_checkpoint(work / "ckpt")
    root = work / "tmpfs"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(root)], check=True)
    try:
        refs, index_dir = root / "refs", root / "index"
        variants = variant_images(shared, work / "variants", 2)  # distinct files
        (refs / "more").mkdir(parents=True)
        for path in variants[:10]:
            shutil.copy(path, refs / path.name)
        config = BuildConfig(
            references=refs, index_dir=index_dir, model=ModelOptions(checkpoint=str(checkpoint), device="cpu")
        )
        build_index(config)
        more = variants[10:50]
        for path in more:
            shutil.copy(path, refs / "more" / path.name)
        results = {"tmpfs_mib": 48, "published_images": len(variants[:10]), "new_images": len(more)}
        for case, leave in (("refused_up_front", 4 * MIB), ("filled_while_encoding", None)):
            before = used_bytes(root)
            if leave is not None:
                fill(root, leave)
            on_progress = FillWhileEncoding(root) if leave is None else None
            try:
                build_index(config, on_progress=on_progress)
                message = "published (not expected)"
            except IndexStoreError as exc:
                message = str(exc)
            ballast = root / ".ballast"
            ballast_bytes = ballast.stat().st_blocks * 512 if ballast.exists() else 0
            after = used_bytes(root) - ballast_bytes
            ballast.unlink(missing_ok=True)
            results[case] = {
                "message": message,
                "used_before_kib": before // 1024,
                "used_after_kib": after // 1024,
                "difference_kib": (after - before) // 1024,
                "version": current_version_name(index_dir),
            }
        report = build_index(config)
        results["next_build_with_room"] = {"version": report.version, "total": report.total}
        return results
    finally:
        subprocess.run(["umount", str(root)], check=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4, help="passes over the 5 queries per setting")
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--out", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parts = args.parts.split(",")
    report: dict = {"machine": machine(torch.device("cpu")), "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "verify" in parts:
            report["verify"] = bench_verify(args.shared, work, args.images, args.rounds)
        if "disk_full" in parts:
            report["disk_full"] = bench_disk_full(args.shared, work)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
