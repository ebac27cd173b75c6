"""`selavpr calibrate --index-dir DIR --queries FOLDER`: fit the answers' probability on photos whose
location is known, and make the index answer with it (docs: evaluation)."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.commands.common import positive_int, print_json
from index_builder.calibration import DEFAULT_RADIUS_M, SUPPLIED_FILE, write_supplied
from index_builder.query_calibration import calibrate_on_queries, labelled_queries
from index_builder.search import Localizer
from model.errors import SelavprError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "calibrate", help="fit the answers' probability on labelled queries (instead of the self-calibration)"
    )
    parser.add_argument("--index-dir", type=Path, required=True)
    parser.add_argument(
        "--queries",
        type=Path,
        help="photos with known locations (locations.csv, @east@north@ file names or EXIF GPS)",
    )
    parser.add_argument(
        "--radius-m", type=float, default=DEFAULT_RADIUS_M, help="an answer is right within this distance"
    )
    parser.add_argument("--rerank-k", type=positive_int, default=100, help="as the server re-ranks")
    parser.add_argument(
        "--no-place-removed",
        dest="place_removed",
        action="store_false",
        help="fit only the answers as they are (not also each with its true place left out)",
    )
    parser.add_argument("--dry-run", action="store_true", help="fit and print, install nothing")
    parser.add_argument(
        "--remove", action="store_true", help=f"delete the supplied calibration ({SUPPLIED_FILE}) and exit"
    )
    parser.add_argument("--checkpoint", default=None, help="default: the one the index was built with")
    parser.add_argument("--device", default="auto")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.remove:
        (args.index_dir / SUPPLIED_FILE).unlink(missing_ok=True)
        print_json({"removed": str(args.index_dir / SUPPLIED_FILE)})
        return 0
    if args.queries is None:
        raise SelavprError("--queries is required (or --remove)")
    queries, unlocated = labelled_queries(args.queries)
    localizer = Localizer.open(args.index_dir, args.checkpoint, args.device)
    calibration, note = calibrate_on_queries(
        localizer, queries, args.rerank_k, args.radius_m, args.place_removed
    )
    out = {"note": note, "queries": len(queries), "without_location": len(unlocated)}
    if calibration is None:
        print_json(out | {"calibrated": False})
        return 1
    if not args.dry_run:
        out["written"] = str(write_supplied(args.index_dir, calibration))
    print_json(out | {"calibrated": True, "calibration": calibration.summary()})
    return 0
