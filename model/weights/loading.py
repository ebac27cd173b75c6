"""`load_model(spec)`: what the user names (a path, 'default' or a registry name) -> a loaded model that
remembers it."""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from model.weights.checkpoints import LoadedModel, load_checkpoint
from model.weights.default import ensure_default_weights
from model.weights.named import ensure_cached
from model.weights.registry import get_entry, is_registered

DEFAULT_CHECKPOINT = "default"


def resolve_checkpoint(spec: str | os.PathLike) -> str | os.PathLike:
    """A name -> the file or directory holding it; a path is returned as it is.

    Names win over a file of the same name in the working directory; write `./NAME` for the file.
    A registry name is downloaded and cached on first use (model.weights.named), then verified."""
    if str(spec) == DEFAULT_CHECKPOINT:
        return ensure_default_weights()
    if is_registered(spec):
        return ensure_cached(get_entry(str(spec)))
    return spec


def is_named(spec: str | os.PathLike) -> bool:
    return str(spec) == DEFAULT_CHECKPOINT or is_registered(spec)


def load_model(
    spec: str | os.PathLike = DEFAULT_CHECKPOINT, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load any supported checkpoint (names included) onto a device, in eval mode."""
    loaded = load_checkpoint(resolve_checkpoint(spec), device)
    if is_named(spec):  # indexes record the name, which another machine resolves to its own cache
        loaded.info = replace(loaded.info, spec=str(spec))
    return loaded
