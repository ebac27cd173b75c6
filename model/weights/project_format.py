"""This project's own checkpoint format: a directory with `model.safetensors` and `config.json` (the
architecture, which parts are trained, a fingerprint of the tensors), written aside and swapped in whole."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import DEFAULT_IMAGE_SIZE, LocalMode, SelaVPRConfig
from model.errors import CheckpointError
from model.selavpr import SelaVPR

PROJECT_FORMAT = "selavpr-checkpoint"
PROJECT_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({short_error(exc)})") from None


def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the float32 tensors, in key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().reshape(-1).view(np.uint8))
    return digest.hexdigest()[:16]


def save_checkpoint(
    model: SelaVPR,
    out_dir: str | os.PathLike,
    *,
    description: str,
    trained_adapters: bool,
    trained_local_head: bool,
    image_size: int = DEFAULT_IMAGE_SIZE,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `model.safetensors` + `config.json`, aside first, then swapped in whole."""
    out = Path(out_dir)
    state = {
        k: v.detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
        if (trained_adapters or ".adapter" not in k)
        and (trained_local_head or not k.startswith("LocalAdapt."))
    }
    config = {
        "format": PROJECT_FORMAT,
        "format_version": PROJECT_FORMAT_VERSION,
        "architecture": model.cfg.with_adapters(trained_adapters).to_dict(),
        "trained_adapters": trained_adapters,
        "trained_local_head": trained_local_head,
        "image_size": image_size,
        "local_mode": str(LocalMode.LOCAL_HEAD if trained_local_head else LocalMode.PATCH_TOKENS),
        "description": description,
        "fingerprint": fingerprint(state),
        "metadata": metadata or {},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(state, str(staging / WEIGHTS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
        (staging / WEIGHTS_FILE).chmod(0o644)
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _replace_dir(new: Path, target: Path) -> None:
    """Swap a finished directory in; a reader sees the old or the new one, never a half-written one."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


def load_project_dir(path: Path) -> tuple[dict[str, torch.Tensor], SelaVPRConfig, dict[str, Any]]:
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"{path}: a checkpoint directory needs {WEIGHTS_FILE} and {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
        if config.get("format") != PROJECT_FORMAT:
            raise ValueError(f"format is {config.get('format')!r}, expected {PROJECT_FORMAT!r}")
        if int(config.get("format_version", 0)) > PROJECT_FORMAT_VERSION:
            raise ValueError(f"format_version {config['format_version']} is newer than this release reads")
        arch = SelaVPRConfig.from_dict(config["architecture"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: invalid checkpoint config ({exc})") from None
    return read_safetensors(weights_path), arch, config


def check_components(
    state: Mapping[str, torch.Tensor], cfg: SelaVPRConfig, config: dict, path: Path, digest: str
) -> None:
    if config.get("trained_local_head") and "LocalAdapt.upconv1.weight" not in state:
        raise CheckpointError(
            f"{path}: config.json declares a trained local head but {WEIGHTS_FILE} has none"
        )
    if cfg.adapters and not any(".adapter1." in k for k in state):
        raise CheckpointError(f"{path}: config.json declares adapters but {WEIGHTS_FILE} has none")
    recorded = config.get("fingerprint")
    if recorded and recorded != digest:
        raise CheckpointError(f"{path}: {WEIGHTS_FILE} does not match the fingerprint in {CONFIG_FILE}")
