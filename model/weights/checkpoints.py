"""Every checkpoint a user brings, loaded by one entry point: `load_checkpoint` recognises the format
(formats.py), reads it safely (unpickle.py, project_format.py) and builds the model it describes."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.config import (
    DEFAULT_IMAGE_SIZE,
    FINAL,
    FeatureBlock,
    LocalMode,
    SelaVPRConfig,
    check_feature_block,
    training_free_block,
)
from model.errors import CheckpointError
from model.selavpr import SelaVPR
from model.weights.formats import (
    EXPECTED,
    CheckpointFormat,
    as_state_dict,
    describe,
    infer_config,
    to_model_keys,
)
from model.weights.project_format import check_components, fingerprint, load_project_dir, read_safetensors
from model.weights.unpickle import safe_torch_load

log = logging.getLogger(__name__)


@dataclass
class CheckpointInfo:
    source: str  # the file or directory the weights were read from
    format: CheckpointFormat
    description: str
    fingerprint: str  # over the loaded tensors: the same weights give the same value in any format
    trained_adapters: bool
    trained_local_head: bool
    image_size: int = DEFAULT_IMAGE_SIZE
    metadata: dict[str, Any] = field(default_factory=dict)
    # What the user asked for ('default', a registry name, a path): indexes record it, so that another
    # machine resolves 'default' to its own cache rather than to this machine's path.
    spec: str = ""

    @property
    def default_local_mode(self) -> LocalMode:
        """The trained 61x61x128 head when there is one; otherwise the training-free patch tokens."""
        return LocalMode.LOCAL_HEAD if self.trained_local_head else LocalMode.PATCH_TOKENS

    def check_local_mode(self, mode: LocalMode) -> LocalMode:
        if mode is LocalMode.LOCAL_HEAD and not self.trained_local_head:
            raise CheckpointError(
                f"{self.source}: local mode '{mode}' needs a trained LocalAdapt head, which this checkpoint "
                f"lacks; use '{LocalMode.PATCH_TOKENS}'"
            )
        return mode

    @property
    def trained(self) -> bool:
        """Trained SelaVPR parts (adapters or local head): the paper's final-norm path is then the only one
        they were trained for."""
        return self.trained_adapters or self.trained_local_head

    def check_feature_block(self, block: FeatureBlock, local_mode: LocalMode, depth: int) -> FeatureBlock:
        block = check_feature_block(block, depth)
        if block != FINAL and local_mode is LocalMode.LOCAL_HEAD:
            raise CheckpointError(
                f"{self.source}: feature block {block} with local mode '{local_mode}': the trained "
                f"local head takes the final-norm tokens; use feature block '{FINAL}', or local mode "
                f"'{LocalMode.PATCH_TOKENS}'"
            )
        return block


@dataclass
class LoadedModel:
    model: SelaVPR
    info: CheckpointInfo

    @property
    def default_feature_block(self) -> FeatureBlock:
        """Trained SelaVPR checkpoints: the paper's path, exactly. Plain backbones (DINOv2 files, the default
        weights) used training-free: an intermediate block's raw output, which localizes far better
        (docs/model.md, "feature block")."""
        return FINAL if self.info.trained else training_free_block(self.model.cfg.vit.depth)


# Tensors a checkpoint may leave out: they then take their defaults (mask_token is never used; p = 3).
OPTIONAL_KEYS = re.compile(r"^(LocalAdapt\..*|aggregation\.1\.p|backbone\.mask_token)$")


def build_model(state: dict[str, torch.Tensor], cfg: SelaVPRConfig, path: Path) -> SelaVPR:
    """Instantiate without random initialisation of the backbone, check every key and shape, load."""
    with torch.device("meta"):
        model = SelaVPR(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not OPTIONAL_KEYS.match(k)]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            problems.append(
                f"{len(items)} {label}: {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}"
            )
    if problems:
        arch = f"{cfg.vit.size_name} (dim {cfg.vit.embed_dim}, depth {cfg.vit.depth})"
        raise CheckpointError(f"{path}: does not fit a {arch} SelaVPR model: {'; '.join(problems)}")
    model = model.to_empty(device="cpu")
    _initialise_optional(model)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=False)
    model.freeze_backbone()
    return model.eval()


def _initialise_optional(model: SelaVPR) -> None:
    """Defaults for what a checkpoint may omit (to_empty leaves memory uninitialised)."""
    for conv in (model.LocalAdapt.upconv1, model.LocalAdapt.upconv2):
        conv.reset_parameters()
    with torch.no_grad():
        model.aggregation[1].p.fill_(model.cfg.gem_p)
        model.backbone.mask_token.zero_()


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint file or directory in any supported format onto a device, in eval mode.
    Names such as 'default' are resolved by model.weights.loading.load_model."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; {EXPECTED}")
    if path.is_dir():
        state, cfg, metadata = load_project_dir(path)
        fmt = CheckpointFormat.SELAVPR
    else:
        safetensors = path.suffix == ".safetensors"
        raw = read_safetensors(path) if safetensors else safe_torch_load(path)
        state, fmt = to_model_keys(as_state_dict(raw, path), path)
        fmt = CheckpointFormat.STATE_DICT if safetensors else fmt
        cfg, metadata = infer_config(state, path), {}
    digest = fingerprint(state)
    if fmt is CheckpointFormat.SELAVPR:
        check_components(state, cfg, metadata, path, digest)
    model = build_model(state, cfg, path)
    trained_head = "LocalAdapt.upconv1.weight" in state
    info = CheckpointInfo(
        source=str(path),
        format=fmt,
        description=metadata.get("description") or describe(fmt, cfg, trained_head),
        fingerprint=digest,
        trained_adapters=cfg.adapters,
        trained_local_head=trained_head,
        image_size=int(metadata.get("image_size", DEFAULT_IMAGE_SIZE)),
        metadata=metadata.get("metadata", {}),
        spec=str(path),
    )
    log.info("loaded %s [%s, fingerprint %s] from %s", info.description, fmt, digest, path)
    return LoadedModel(model=model.to(device), info=info)
