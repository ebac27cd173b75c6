"""`selavpr serve`: until the HTTP service lands, prepare the model and say what would be served."""

from __future__ import annotations

import argparse

from app.commands.common import add_model_options, extractor_kwargs, print_json
from model.extractor import FeatureExtractor


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="run the service (for now: load the model and describe it)")
    add_model_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    extractor = FeatureExtractor.from_checkpoint(**extractor_kwargs(args))
    print_json(
        {
            "status": "the HTTP service is not implemented yet; this is what it will serve",
            "checkpoint": extractor.info.description,
            "source": extractor.info.source,
            "fingerprint": extractor.info.fingerprint,
            "device": str(extractor.device),
            "image_size": list(extractor.preprocessing.image_size),
            "local_mode": str(extractor.local_mode),
        }
    )
    return 0
