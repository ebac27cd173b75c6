"""`selavpr match A B`: MNN count between two images, optionally drawn."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.commands.common import add_model_options, model_options, print_json
from model.extractor import FeatureExtractor
from model.matching import mnn_pairs
from model.preprocess import open_rgb
from model.visualize import draw_matches, position_to_pixel


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("match", help="count mutual nearest-neighbour matches between two images")
    parser.add_argument("image_a", metavar="IMAGE_A")
    parser.add_argument("image_b", metavar="IMAGE_B")
    parser.add_argument("--visualize", metavar="OUT.png", help="draw the mutual matches side by side")
    parser.add_argument(
        "--max-lines", type=int, default=300, help="matches drawn at most (default: %(default)s)"
    )
    parser.add_argument(
        "--reference-compatible",
        action="store_true",
        help="score exactly one match as 0, as the authors' code does",
    )
    add_model_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    extractor = FeatureExtractor.from_options(model_options(args))
    emb = extractor.embed([args.image_a, args.image_b])
    if emb.skipped:
        raise ValueError("; ".join(reason for _, reason in emb.skipped))
    query_idx, cand_idx = mnn_pairs(emb.local[0], emb.local[1])
    count = len(query_idx)
    result = {
        "mnn_matches": 0 if args.reference_compatible and count == 1 else count,
        "global_similarity": float(emb.global_desc[0] @ emb.global_desc[1]),
        "local_mode": str(emb.local_mode),
        "feature_block": emb.feature_block,
        "local_shape": list(emb.local.shape[1:]),
        "checkpoint": extractor.info.description,
        "fingerprint": extractor.info.fingerprint,
    }
    if args.visualize:
        result["visualization"] = str(
            save_visualization(args, extractor, emb.local.shape[1:3], query_idx, cand_idx)
        )
    print_json(result)
    return 0


def save_visualization(args, extractor, map_hw, query_idx, cand_idx) -> Path:
    input_hw = extractor.preprocessing.image_size
    images = [open_rgb(p, extractor.preprocessing.exif_transpose) for p in (args.image_a, args.image_b)]
    points = [
        position_to_pixel(idx.numpy(), map_hw, input_hw, image.size)
        for idx, image in zip((query_idx, cand_idx), images, strict=True)
    ]
    out = Path(args.visualize)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_matches(*images, *points, max_lines=args.max_lines).save(out)
    return out
