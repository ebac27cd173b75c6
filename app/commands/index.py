"""`selavpr index build|status|rollback`: build a reference index incrementally, describe and verify
one, and serve an earlier intact version again."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from app.commands.common import add_engine_options, add_model_options, model_options, positive_int, print_json
from index_builder.builder import BuildConfig, BuildProgress, build_index
from index_builder.global_index import KINDS, GlobalIndexConfig
from index_builder.manifest import BuildReport
from index_builder.rollback import rollback
from index_builder.status import index_status, status_exit_code
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
    build.add_argument(
        "--segment-size", type=positive_int, default=256, help="images per feature segment (stored files)"
    )
    # the old name of --segment-size, accepted with a warning
    build.add_argument(
        "--shard-size",
        dest="segment_size",
        type=positive_int,
        default=argparse.SUPPRESS,
        action=_DeprecatedAlias,
        help=argparse.SUPPRESS,
    )
    build.add_argument(
        "--shards",
        type=positive_int,
        default=None,
        help="location shards (ranges of S2 cells) searched separately; 1: none; default: as published",
    )
    build.add_argument("--decode-workers", type=positive_int, default=2)
    build.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="skip self-calibration: answers carry no probability (docs: evaluation)",
    )
    build.add_argument(
        "--grace-seconds",
        type=float,
        default=DEFAULT_GRACE_SECONDS,
        help="keep superseded versions this long",
    )
    add_model_options(build)
    ray = add_engine_options(
        build,
        "local: encode in this process; ray: on a Ray Data actor pool (same features, bit for bit)",
        "a running cluster (auto, host:6379); else start a local one",
    )
    ray.add_argument(
        "--ray-actors", type=positive_int, default=None, help="encoder actors (default: GPUs or 1)"
    )
    ray.add_argument("--ray-actor-cpus", type=float, default=1.0, help="CPUs each actor reserves")
    ray.add_argument(
        "--ray-actor-threads",
        type=positive_int,
        default=None,
        help="torch threads per actor (default: this process's; the same count gives the same bits)",
    )
    ray.add_argument(
        "--ray-actor-gpus",
        type=float,
        default=None,
        help="GPUs per actor (default: 1 when the cluster has GPUs)",
    )
    build.set_defaults(run=run_build)

    status = actions.add_parser("status", help="print the published version and the last build report")
    status.add_argument("--index-dir", type=Path, required=True)
    status.add_argument(
        "--verify",
        action="store_true",
        help="recompute the checksums of every file; exit 1 when any check fails, 3 with no index",
    )
    status.set_defaults(run=run_status)

    back = actions.add_parser(
        "rollback", help="publish the newest earlier version that verifies (a running server follows)"
    )
    back.add_argument("--index-dir", type=Path, required=True)
    back.add_argument("--to", default=None, metavar="VERSION", help="this version (it must verify)")
    back.set_defaults(run=run_rollback)


class _DeprecatedAlias(argparse.Action):
    """Stores like the option it stands for, and says which that is."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{option_string} is deprecated; use --segment-size", file=sys.stderr)
        setattr(namespace, self.dest, values)


def run_build(args: argparse.Namespace) -> int:
    config = BuildConfig(
        references=args.references,
        index_dir=args.index_dir,
        model=model_options(args),
        full=args.full,
        calibrate=args.calibrate,
        batch_size=args.batch_size,
        segment_size=args.segment_size,
        decode_workers=args.decode_workers,
        local_dtype=args.local_dtype,
        global_index=GlobalIndexConfig(kind=args.global_index),
        grace_seconds=args.grace_seconds,
        shards=args.shards,
    )
    if args.engine == "ray":
        report = _build_on_ray(config, args)
    else:
        with ProgressBar() as bar:
            report = build_index(config, on_progress=bar.update)
    for skipped in report.skipped_files:
        print(f"skipped {skipped['path']}: {skipped['reason']}", file=sys.stderr)
    for problem in report.location_problems:
        print(f"locations: {problem}", file=sys.stderr)
    print(json.dumps(report.summary()))
    return 0


def _build_on_ray(config: BuildConfig, args: argparse.Namespace) -> BuildReport:
    """The same build with its encoding on Ray Data (index_builder/ray_build.py); the driver's model,
    on CPU, only states the encoding identity that the actors must reproduce."""
    from app.ray_engine import require_ray_data

    try:
        require_ray_data()
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None  # one line, exit 2 (app.cli)
    import ray

    from index_builder.builder import encoding_identity
    from index_builder.ray_build import RayBuildOptions, RayDataEncoder, ray_session
    from model.extractor import FeatureExtractor

    options = RayBuildOptions(address=args.ray_address, num_cpus=args.ray_num_cpus)
    with ray_session(options):
        cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
        gpus = args.ray_actor_gpus if args.ray_actor_gpus is not None else (1.0 if cluster_gpus else 0.0)
        actors = args.ray_actors or max(1, cluster_gpus if gpus else 1)
        options = replace(
            options,
            actors=actors,
            actor_cpus=args.ray_actor_cpus,
            actor_threads=args.ray_actor_threads,
            actor_gpus=gpus,
        )
        extractor = FeatureExtractor.from_options(config.model.on("cpu"))
        actors_model = config.model.on("cuda" if gpus > 0 else "cpu")
        encoder = RayDataEncoder(actors_model, encoding_identity(extractor, config.local_dtype), options)
        with ProgressBar() as bar:
            return build_index(config, extractor, on_progress=bar.update, encoder=encoder)


def run_status(args: argparse.Namespace) -> int:
    status = index_status(args.index_dir, args.verify)
    print_json(status)
    return status_exit_code(status, args.verify)


def run_rollback(args: argparse.Namespace) -> int:
    done = rollback(args.index_dir, args.to)
    print_json({"previous": done.previous, "current": done.current, "rejected": done.rejected})
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
