"""Which precision a device computes MNN counts in by default: a choice that depends on the kernels the
device has (model.matching.kernels), made once here."""

from __future__ import annotations

import torch

import model.matching.kernels as kernels
from model.matching.precision import Precision

# int8+float32 becomes the default only where int8 products run at least this many times faster than
# float32 ones: then one int8 pass plus K/4 float32 recounts (refine.py) stays below float32 alone.
INT8_DEFAULT_MIN_SPEEDUP = 2.0


def default_precision(device: torch.device) -> Precision:
    """int8+float32 on CPUs whose int8 products are fast enough, else exact float32.

    GPUs take float32: there the reductions over each similarity tile bound the engine, not the products,
    and the int8 pass alone was slower than all of float32 (H200, K = 100 at 61x61x128: 25.4 ms against
    15.2 ms; README "GPU check")."""
    if device.type != "cpu":
        return Precision.FLOAT32
    fast_int8 = kernels.int8_gemm_speedup(device) >= INT8_DEFAULT_MIN_SPEEDUP
    return Precision.INT8_FLOAT32 if fast_int8 else Precision.FLOAT32


def resolve_precision(precision: str | Precision | None, device: torch.device) -> Precision:
    if precision is None:
        return default_precision(device)
    try:
        return Precision(precision)
    except ValueError:
        raise ValueError(
            f"unknown precision {precision!r}; expected one of {[p.value for p in Precision]}"
        ) from None
