"""`selavpr serve`: the HTTP service (uvicorn), configured by flags or SELAVPR_* variables."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.commands.common import positive_int
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
    "--model-dtype": ("model_dtype", str),
    "--max-batch-size": ("max_batch_size", positive_int),
    "--max-batch-wait-ms": ("max_batch_wait_ms", float),
    "--max-upload-bytes": ("max_upload_bytes", positive_int),
    "--api-key": ("api_key", str),
    "--localize-api-key": ("localize_api_key", str),
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="run the HTTP service")
    for flag, (field, kind) in FLAGS.items():
        parser.add_argument(flag, dest=field, type=kind, default=None, help=f"SELAVPR_{field.upper()}")
    parser.add_argument("--no-build-on-start", dest="build_on_start", action="store_false", default=None)
    parser.add_argument("--log-level", default="info")
    parser.set_defaults(run=run)


def settings_from(args: argparse.Namespace) -> Settings:
    """Flags given on the command line override the environment."""
    fields = [f for f, _ in FLAGS.values()] + ["build_on_start"]
    return Settings(**{f: getattr(args, f) for f in fields if getattr(args, f, None) is not None})


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from app.heap import limit_arenas
    from app.main import create_app

    limit_arenas()
    settings = settings_from(args)
    settings.index_dir.mkdir(parents=True, exist_ok=True)
    settings.references.mkdir(parents=True, exist_ok=True)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
    return 0
