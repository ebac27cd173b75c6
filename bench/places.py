"""Benchmark: how well each feature block recognises the shared places, every image as a query.

Each of the 30 triplet views (10 places x 3) queries the other 29 plus the two Tokyo images (31
candidates): global top-1 of the same place, top-1 after MNN re-ranking of the global top-5 and of all
candidates (exact float32 counts), and the mean MNN count of same-place pairs against other pairs. The
Tokyo query is ranked against its database image plus the 30 triplet views. Prints one JSON document.

    python -m bench.places [--blocks 4,6,7,8,9,11,final] [--checkpoint default] [--image-size 224]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from bench.common import DEFAULT_SHARED, emit, machine
from model.config import parse_feature_block
from model.extractor import FeatureExtractor
from model.matching import mnn_scores
from model.weights.loading import load_model


def images(shared: Path) -> tuple[list[Path], np.ndarray]:
    """The 30 triplet views then tokyo_db, tokyo_query; place ids (Tokyo is place 100)."""
    paths = sorted((shared / "matching_triplets").glob("p*/i*/*.jpg"))
    places = [int(p.parent.parent.name[1:]) for p in paths]
    paths += [shared / "tokyo_pair" / "tokyo_db.png", shared / "tokyo_pair" / "tokyo_query.jpg"]
    return paths, np.array([*places, 100, 100])


def score_block(extractor: FeatureExtractor, paths: list[Path], places: np.ndarray) -> dict:
    emb = extractor.embed(paths)
    g, local = emb.global_desc, torch.from_numpy(emb.local)
    n = len(paths)
    counts = np.stack([mnn_scores(local[i], local, "float32").numpy() for i in range(n)])
    sim = g @ g.T
    hits = {"global": 0, "rerank_top5": 0, "rerank_all": 0}
    same, other = [], []
    for q in range(30):
        cands = np.array([c for c in range(n) if c != q and c != n - 1])  # not itself, not the Tokyo query
        order = cands[np.argsort(-sim[q, cands], kind="stable")]
        top5 = order[:5]
        hits["global"] += places[order[0]] == places[q]
        hits["rerank_top5"] += places[top5[np.argmax(counts[q, top5])]] == places[q]
        hits["rerank_all"] += places[cands[np.argmax(counts[q, cands])]] == places[q]
        for c in range(30):
            if c != q:
                (same if places[c] == places[q] else other).append(counts[q, c])
    tokyo_q, tokyo_db = n - 1, n - 2
    cands = np.arange(n - 1)  # the Tokyo database image and the 30 triplet views
    return {
        "same_place_top1_of_30": {k: int(v) for k, v in hits.items()},
        "mean_mnn_same_place": round(float(np.mean(same)), 1),
        "mean_mnn_other_places": round(float(np.mean(other)), 1),
        "tokyo_rank_global": 1 + int((sim[tokyo_q, cands] > sim[tokyo_q, tokyo_db]).sum()),
        "tokyo_rank_mnn": 1 + int((counts[tokyo_q, cands] > counts[tokyo_q, tokyo_db]).sum()),
        "tokyo_mnn": int(counts[tokyo_q, tokyo_db]),
    }


def measure(args: argparse.Namespace) -> dict:
    loaded = load_model(args.checkpoint, "cpu")
    paths, places = images(args.shared_data)
    results = {}
    for text in args.blocks.split(","):
        block = parse_feature_block(text)
        extractor = FeatureExtractor(loaded, feature_block=block, image_size=args.image_size)
        results[str(block)] = score_block(extractor, paths, places)
    return {
        "benchmark": "places",
        "machine": machine(torch.device("cpu")),
        "checkpoint": loaded.info.description,
        "image_size": args.image_size or loaded.info.image_size,
        "blocks": results,
    }


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="python -m bench.places", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--blocks", default="4,6,7,8,9,11,final", help="block indices and/or 'final'")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--out", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    emit(measure(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
