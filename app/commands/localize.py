"""`selavpr localize IMAGE --index-dir DIR`: what the HTTP API answers for one photo."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.commands.common import positive_int, print_json
from index_builder.results import DEFAULT_RERANK_K, DEFAULT_TOP_K, apply_min_probability
from index_builder.search import Localizer
from index_builder.sharding import LocationPrior


def location_prior(text: str) -> LocationPrior:
    try:
        lat, lon, radius_m = (float(part) for part in text.split(","))
        return LocationPrior(lat, lon, radius_m)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LAT,LON,RADIUS_M ({exc})") from None


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is outside 0..1")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("localize", help="find the reference images of the same place, and where it is")
    parser.add_argument("image", metavar="IMAGE")
    parser.add_argument("--index-dir", type=Path, required=True)
    parser.add_argument("--top-k", type=positive_int, default=DEFAULT_TOP_K, help="matches returned")
    parser.add_argument(
        "--rerank-k", type=positive_int, default=DEFAULT_RERANK_K, help="candidates re-ranked"
    )
    parser.add_argument(
        "--prior",
        type=location_prior,
        default=None,
        metavar="LAT,LON,RADIUS_M",
        help="search only the location shards within RADIUS_M metres of LAT,LON",
    )
    parser.add_argument(
        "--min-probability",
        type=probability,
        default=None,
        metavar="P",
        help="below this calibrated probability answer 'unknown' (no location, matches still listed)",
    )
    parser.add_argument("--checkpoint", default=None, help="default: the one the index was built with")
    parser.add_argument("--device", default="auto")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    localizer = Localizer.open(args.index_dir, args.checkpoint, args.device)
    result = localizer.localize(args.image, args.image, args.top_k, args.rerank_k, args.prior)
    print_json(apply_min_probability(result, args.min_probability).model_dump())
    return 0
