"""`load_model(spec)`: what the user names (a path or 'default') -> a loaded model that remembers it."""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from model.checkpoints import LoadedModel, load_checkpoint
from model.default_weights import ensure_default_weights

DEFAULT_CHECKPOINT = "default"


def resolve_checkpoint(spec: str | os.PathLike) -> str | os.PathLike:
    """A name -> the file or directory holding it; a path is returned as it is."""
    if str(spec) == DEFAULT_CHECKPOINT:
        return ensure_default_weights()
    return spec


def load_model(
    spec: str | os.PathLike = DEFAULT_CHECKPOINT, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load any supported checkpoint ('default' included) onto a device, in eval mode."""
    loaded = load_checkpoint(resolve_checkpoint(spec), device)
    if str(spec) == DEFAULT_CHECKPOINT:
        loaded.info = replace(loaded.info, spec=DEFAULT_CHECKPOINT)
    return loaded
