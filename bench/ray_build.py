"""Build throughput: `index build` in one process against `--engine ray` (Ray Data actor pool) on the 32
shared images with the default weights, on CPU; and whether the Ray indexes equal the single-process one
bit for bit. Each build is a full build into a fresh folder; the Ray builds share one local cluster,
whose start-up is reported apart.

Run it inside a loopback-only network namespace, as the tests run Ray:

    unshare -n sh -c 'ip link set lo up && exec .venv/bin/python -m bench.ray_build [--out FILE]'
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import DEFAULT_SHARED, emit, machine
from index_builder.builder import BuildConfig, build_index, encoding_identity
from index_builder.ray_build import RayBuildOptions, RayDataEncoder, ray_session
from index_builder.store import IndexVersion, SegmentFiles, segment_dir
from model.extractor import FeatureExtractor
from model.options import ModelOptions
from tests.helpers import shared_references

# (actors, CPUs reserved and torch threads per actor)
RAY_SETUPS = ((1, 2), (2, 1))


def _features(index_dir: Path) -> dict[str, bytes]:
    version = IndexVersion.open_current(index_dir)
    out = {}
    for record in version.all_records():
        files = SegmentFiles(segment_dir(index_dir, record.segment))
        values, scale = files.read_stored([record.row])
        out[record.path] = (
            files.read_global()[record.row].tobytes() + values.tobytes() + np.asarray(scale).tobytes()
        )
        files.close()
    version.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = Path(tempfile.mkdtemp(prefix="bench-ray-build-"))
    refs = shared_references(args.shared, root / "refs")
    extractor = FeatureExtractor.from_checkpoint("default", "cpu")
    identity = encoding_identity(extractor, "int8")
    report: dict = {"machine": machine(extractor.device), "images": 32, "builds": []}

    def build(name: str, encoder=None, **extra) -> dict:
        config = BuildConfig(references=refs, index_dir=root / name, batch_size=16)
        started = time.monotonic()
        built = build_index(config, extractor, encoder=encoder)
        seconds = time.monotonic() - started
        assert built.encoded == 32
        return {
            "build": name,
            **extra,
            "seconds": round(seconds, 2),
            "encode_seconds": built.encode_seconds,
            "images_per_s": round(32 / seconds, 2),
            "encode_images_per_s": round(32 / built.encode_seconds, 2),
        }

    report["builds"].append(build("single-process", torch_threads=torch.get_num_threads()))
    expected = _features(root / "single-process")
    started = time.monotonic()
    with ray_session(RayBuildOptions(num_cpus=os.cpu_count())):
        report["ray_cluster_start_s"] = round(time.monotonic() - started, 2)
        for actors, cpus in RAY_SETUPS:
            options = RayBuildOptions(actors=actors, actor_cpus=cpus, actor_threads=cpus)
            spec = ModelOptions(checkpoint="default", device="cpu")
            name = f"ray-{actors}x{cpus}"
            entry = build(
                name, RayDataEncoder(spec, identity, options), actors=actors, threads_per_actor=cpus
            )
            entry["bit_identical"] = _features(root / name) == expected
            report["builds"].append(entry)
    emit(report, args.out)


if __name__ == "__main__":
    main()
