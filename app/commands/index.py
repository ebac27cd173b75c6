"""`selavpr index build|status`: build a reference index incrementally, and describe one."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from app.commands.common import add_model_options, positive_int, print_json
from index_builder.builder import BuildConfig, BuildProgress, build_index
from index_builder.global_index import KINDS, GlobalIndexConfig
from index_builder.status import index_status
from index_builder.store import DEFAULT_GRACE_SECONDS, DEFAULT_LOCAL_DTYPE, LOCAL_DTYPES


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("index", help="build or inspect a reference index")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    build = actions.add_parser("build", help="encode new and changed reference images, publish a version")
    build.add_argument("--references", type=Path, required=True, help="folder of reference images")
    build.add_argument("--index-dir", type=Path, required=True)
    build.add_argument("--full", action="store_true", help="re-encode every image")
    build.add_argument("--batch-size", type=positive_int, default=None, help="default: 16 on CPU, 64 on GPU")
    build.add_argument("--global-index", choices=KINDS, default="flat", help="default: exact inner product")
    build.add_argument(
        "--local-dtype", choices=LOCAL_DTYPES, default=DEFAULT_LOCAL_DTYPE, help="stored local features"
    )
    build.add_argument("--shard-size", type=positive_int, default=256, help="images per feature shard")
    build.add_argument(
        "--shards",
        type=positive_int,
        default=None,
        help="location shards (ranges of S2 cells) searched separately; 1: none; default: as published",
    )
    build.add_argument("--decode-workers", type=positive_int, default=2)
    build.add_argument(
        "--grace-seconds",
        type=float,
        default=DEFAULT_GRACE_SECONDS,
        help="keep superseded versions this long",
    )
    add_model_options(build)
    build.set_defaults(run=run_build)

    status = actions.add_parser("status", help="print the published version and the last build report")
    status.add_argument("--index-dir", type=Path, required=True)
    status.add_argument("--verify", action="store_true", help="recompute the checksums of every file")
    status.set_defaults(run=run_status)


def run_build(args: argparse.Namespace) -> int:
    config = BuildConfig(
        references=args.references,
        index_dir=args.index_dir,
        checkpoint=args.checkpoint,
        device=args.device,
        image_size=args.image_size,
        local_mode=args.local_mode,
        feature_block=args.feature_block,
        model_dtype=args.model_dtype,
        full=args.full,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        decode_workers=args.decode_workers,
        local_dtype=args.local_dtype,
        global_index=GlobalIndexConfig(kind=args.global_index),
        grace_seconds=args.grace_seconds,
        shards=args.shards,
    )
    with ProgressBar() as bar:
        report = build_index(config, on_progress=bar.update)
    for skipped in report.skipped_files:
        print(f"skipped {skipped['path']}: {skipped['reason']}", file=sys.stderr)
    for problem in report.location_problems:
        print(f"locations: {problem}", file=sys.stderr)
    print(json.dumps(report.summary()))
    return 0


def run_status(args: argparse.Namespace) -> int:
    print_json(index_status(args.index_dir, args.verify))
    return 0


class ProgressBar:
    """A tqdm bar per build phase on stderr (silent when stderr is not a terminal)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.phase = ""

    def update(self, progress: BuildProgress) -> None:
        if progress.phase != self.phase:
            self.close()
            self.phase = progress.phase
            if progress.phase in ("hashing", "encoding"):
                self.bar = tqdm(
                    total=progress.total, desc=progress.phase, unit="img", file=sys.stderr, disable=None
                )
        if self.bar is not None:
            self.bar.n = progress.done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
