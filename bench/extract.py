"""Benchmark: descriptor extraction time per image for each feature block, default weights.

The 30 shared triplet images are decoded and preprocessed once; then, per block, batches go through
`FeatureExtractor.extract_tensors` (network, GeM, local features), interleaved over the blocks so that a
slow spell of the machine hits all of them alike. Reports the median ms per image over the rounds.

    python -m bench.extract [--blocks 4,6,7,8,11,final] [--batch-size 8] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import DEFAULT_SHARED, emit, machine
from model.config import parse_feature_block
from model.extractor import FeatureExtractor, resolve_device
from model.weights.loading import load_model


def measure(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    loaded = load_model(args.checkpoint, device)
    blocks = [parse_feature_block(b) for b in args.blocks.split(",")]
    extractors = {
        str(b): FeatureExtractor(loaded, feature_block=b, batch_size=args.batch_size) for b in blocks
    }
    paths = sorted((args.shared_data / "matching_triplets").glob("p*/i*/*.jpg"))
    prep = next(iter(extractors.values())).preprocessing
    images = torch.stack([prep.load(p, str(p)) for p in paths])
    batches = list(torch.split(images, args.batch_size))
    for extractor in extractors.values():  # warm-up: allocator, position-table cache
        extractor.extract_tensors(batches[0])
    per_image_ms: dict[str, list[float]] = {name: [] for name in extractors}
    for _ in range(args.rounds):
        for name, extractor in extractors.items():
            start = time.perf_counter()
            for batch in batches:
                extractor.extract_tensors(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            per_image_ms[name].append(1e3 * (time.perf_counter() - start) / len(images))
    return {
        "benchmark": "extract",
        "machine": machine(device),
        "checkpoint": loaded.info.description,
        "images": len(images),
        "image_size": list(prep.image_size),
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "ms_per_image": {
            name: {"median": round(statistics.median(v), 2), "min": round(min(v), 2), "max": round(max(v), 2)}
            for name, v in per_image_ms.items()
        },
    }


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="python -m bench.extract", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--blocks", default="4,6,7,8,11,final", help="block indices and/or 'final'")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--out", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    emit(measure(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
