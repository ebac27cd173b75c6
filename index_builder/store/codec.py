"""Compact local features: how dense maps are stored (int8 with per-position scales, or float16)."""

from __future__ import annotations

import numpy as np
import torch

LOCAL_DTYPES = ("int8", "float16")
DEFAULT_LOCAL_DTYPE = "int8"  # 0.46 MiB per 61x61x128 map, see docs/references.md


def encode_local(local: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """(n, h, w, C) float32 unit vectors -> stored arrays. int8: each position scaled by its own largest
    component (kept as float16), so every position uses the full int8 range."""
    if dtype == "float16":
        return {"local": local.astype(np.float16)}
    scale = np.abs(local).max(axis=-1).astype(np.float16)
    safe = np.where(scale > 0, scale.astype(np.float32), 1.0)[..., None]
    values = np.clip(np.rint(local / safe * 127), -127, 127).astype(np.int8)
    return {"local": values, "scale": scale}


def decode_local(values: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Stored arrays -> float32 maps, each position renormalised to unit length as the original was:
    rounding changes lengths a little, and a longer candidate vector would win argmaxes it should not
    (it cuts the count error by a third, measured in docs/benchmarks.md)."""
    decoded = values.astype(np.float32)
    if scale is not None:
        decoded *= scale.astype(np.float32)[..., None] / 127
    norms = np.linalg.norm(decoded, axis=-1, keepdims=True)
    return np.divide(decoded, norms, out=np.zeros_like(decoded), where=norms > 0)


def decode_local_on(values: np.ndarray, scale: np.ndarray | None, device: torch.device) -> torch.Tensor:
    """`decode_local` computed on `device`: on an accelerator the compact arrays cross (a quarter of the
    float32 bytes for int8) and are decoded there. On CPU it is `decode_local` itself."""
    if device.type == "cpu":
        return torch.from_numpy(decode_local(values, scale))
    scale_t = None if scale is None else torch.from_numpy(scale).to(device, non_blocking=True)
    return decode_local_torch(torch.from_numpy(values).to(device, non_blocking=True), scale_t)


def decode_local_torch(values: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """`decode_local` in torch, on the tensors' device (equal to it up to float rounding)."""
    decoded = values.float()
    if scale is not None:
        decoded = decoded * (scale.float()[..., None] / 127)
    norms = torch.linalg.vector_norm(decoded, dim=-1, keepdim=True)
    return torch.where(norms > 0, decoded / norms.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
