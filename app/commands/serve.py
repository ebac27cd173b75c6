"""`selavpr serve`: the HTTP service (uvicorn), configured by flags or SELAVPR_* variables."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.commands.common import add_engine_options, feature_block, positive_int
from app.settings import Settings

# flag -> Settings field; every flag defaults to the environment / built-in default
FLAGS = {
    "--index-dir": ("index_dir", Path),
    "--references": ("references", Path),
    "--checkpoint": ("checkpoint", str),
    "--device": ("device", str),
    "--host": ("host", str),
    "--port": ("port", int),
    "--image-size": ("image_size", positive_int),
    "--feature-block": ("feature_block", feature_block),
    "--model-dtype": ("model_dtype", str),
    "--max-batch-size": ("max_batch_size", positive_int),
    "--max-batch-wait-ms": ("max_batch_wait_ms", float),
    "--max-upload-bytes": ("max_upload_bytes", positive_int),
    "--api-key": ("api_key", str),
    "--localize-api-key": ("localize_api_key", str),
    "--tile-url": ("tile_url", str),
    "--tile-attribution": ("tile_attribution", str),
    "--root-path": ("root_path", str),
    "--max-connections": ("max_connections", positive_int),
    "--resident-maps-bytes": ("resident_maps_bytes", int),
    "--shard-timeout-s": ("shard_timeout_s", float),
    "--min-probability": ("min_probability", float),
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="run the HTTP service")
    for flag, (field, kind) in FLAGS.items():
        parser.add_argument(flag, dest=field, type=kind, default=None, help=f"SELAVPR_{field.upper()}")
    parser.add_argument("--no-build-on-start", dest="build_on_start", action="store_false", default=None)
    parser.add_argument(
        "--insecure-open-admin",
        dest="insecure_open_admin",
        action="store_true",
        default=None,
        help="serve the admin endpoints without a key beyond loopback (trusted networks only)",
    )
    parser.add_argument("--log-level", default="info")
    ray = add_engine_options(
        parser,
        "local: this process; ray: Ray Serve deployments (one per location shard)",
        "a running cluster (auto, host:6379); else start one",
    )
    ray.add_argument("--shard-replicas", type=positive_int, default=1, help="replicas of each shard")
    ray.add_argument("--encoder-replicas", type=positive_int, default=1)
    ray.add_argument("--ingress-replicas", type=positive_int, default=1)
    ray.add_argument(
        "--replica-num-cpus",
        type=non_negative_float,
        default=None,
        help="CPUs each replica reserves (ingress, encoder, rebuilder, every shard's). Default: on a "
        "cluster started here, its CPUs shared equally among the replicas (at most 1 each, e.g. 0.4 "
        "for 5 replicas on 2 CPUs); on a cluster joined (--ray-address), 1. Explicit requests are "
        "kept; a cluster started here that cannot hold them is refused at once",
    )
    ray.add_argument(
        "--encoder-num-gpus", type=non_negative_float, default=0.0, help="GPUs (or a share) per encoder"
    )
    ray.add_argument(
        "--shard-num-gpus",
        type=non_negative_float,
        default=0.0,
        help="GPUs (or a share) per shard replica: it keeps its maps in the GPU's memory (up to "
        "--resident-maps-bytes) and re-ranks there, as the single process does on a GPU",
    )
    ray.add_argument(
        "--ready-timeout-s",
        type=float,
        default=300.0,
        help="exit with an error when the deployments are not all running by then (default: %(default)s)",
    )
    parser.set_defaults(run=run)


def settings_from(args: argparse.Namespace) -> Settings:
    """Flags given on the command line override the environment."""
    fields = [f for f, _ in FLAGS.values()] + ["build_on_start", "insecure_open_admin"]
    return Settings(**{f: getattr(args, f) for f in fields if getattr(args, f, None) is not None})


def run(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        return run_on_ray(args)
    import uvicorn

    from app.heap import limit_arenas, return_large_blocks
    from app.main import create_app
    from app.protocol import deadline_protocol
    from app.settings import check_exposure
    from model.weights.loading import resolve_checkpoint
    from model.weights.registry import is_registered

    limit_arenas()
    return_large_blocks()
    settings = settings_from(args)
    check_exposure(settings)  # before touching the disk
    if is_registered(settings.checkpoint):  # download before the server starts: an error exits 2 here
        resolve_checkpoint(settings.checkpoint)
    settings.index_dir.mkdir(parents=True, exist_ok=True)
    settings.references.mkdir(parents=True, exist_ok=True)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        root_path=settings.root_path,
        limit_concurrency=settings.max_connections,  # beyond it uvicorn answers 503 at once
        timeout_keep_alive=settings.keep_alive_s,
        http=deadline_protocol(settings.head_timeout_s, settings.body_timeout_s),  # app/protocol.py: why
    )
    return 0


def run_on_ray(args: argparse.Namespace) -> int:
    from app.ray_engine import require_ray
    from app.settings import check_exposure

    try:
        require_ray()
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None  # one line, exit 2 (app.cli)
    from app.ray_engine.launch import ClusterConfig, serve_until_stopped
    from app.ray_engine.placement import RayEngineConfig

    settings = settings_from(args)
    check_exposure(settings)
    engine = RayEngineConfig(
        shard_replicas=args.shard_replicas,
        encoder_replicas=args.encoder_replicas,
        ingress_replicas=args.ingress_replicas,
        replica_num_cpus=args.replica_num_cpus,
        encoder_num_gpus=args.encoder_num_gpus,
        shard_num_gpus=args.shard_num_gpus,
    )
    cluster = ClusterConfig(
        address=args.ray_address, num_cpus=args.ray_num_cpus, ready_timeout_s=args.ready_timeout_s
    )
    return serve_until_stopped(settings, engine, cluster)


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value
