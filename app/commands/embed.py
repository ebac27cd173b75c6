"""`selavpr embed IMAGE...`: global descriptors and local maps to an .npz file."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from app.commands.common import add_model_options, model_options, print_json
from model.extractor import FeatureExtractor


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("embed", help="encode images to global descriptors and local feature maps")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--out", default="embeddings.npz", help="output .npz (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    add_model_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    extractor = FeatureExtractor.from_options(model_options(args), batch_size=args.batch_size)
    emb = extractor.embed(args.images)
    out = Path(args.out)
    if emb.names:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            out,
            **{"global": emb.global_desc, "local": emb.local},
            paths=np.array(emb.names),
            local_mode=np.array(str(emb.local_mode)),
            feature_block=np.array(str(emb.feature_block)),
            fingerprint=np.array(extractor.info.fingerprint),
            image_size=np.array(extractor.preprocessing.image_size),
        )
    print_json(
        {
            "out": str(out) if emb.names else None,
            "embedded": len(emb.names),
            "global_shape": list(emb.global_desc.shape),
            "local_shape": list(emb.local.shape),
            "local_mode": str(emb.local_mode),
            "feature_block": emb.feature_block,
            "checkpoint": extractor.info.description,
            "fingerprint": extractor.info.fingerprint,
            "skipped": [{"path": name, "reason": reason} for name, reason in emb.skipped],
        }
    )
    return 0 if emb.names else 1
