"""Which precision a device computes MNN counts in by default: a choice that depends on the kernels the
device has (model.matching.native on AVX-512 CPUs, else model.matching.kernels), made once here."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence

import torch

import model.matching.kernels as kernels
import model.matching.native as native
from model.matching.engine import best_matches
from model.matching.maps import DenseMaps
from model.matching.precision import Precision

# int8+float32 becomes the default only where int8 matching runs at least this many times faster than
# float32: one int8 pass plus K/4 float32 recounts (refine.py) then costs at most 0.65 of float32 alone,
# a margin for the policy's own per-call costs. At 2x on 16x16x384 patch tokens (30 candidates, 7
# recounts) the policy measured 1.1x float32's time: those costs are not negligible on small maps.
INT8_DEFAULT_MIN_SPEEDUP = 2.5


# The map shape the default is decided on when the caller gives none: SelaVPR's local head at 224 px.
CALIBRATION_SHAPE = (61, 61, 128)
CALIBRATION_PRODUCTS = (61 * 61) ** 2 * 128  # multiply-adds of one such pair


def default_precision(device: torch.device, map_shape: Sequence[int] | None = None) -> Precision:
    """int8+float32 on CPUs where int8 matching of maps of this shape (h, w, C) runs at least 2.5x as
    fast as float32, else exact float32. With the C kernels on a 2-core Xeon with AMX: 61x61x128 local
    head maps 3.7-5.5x (int8+float32 there), 32x32x768 about 3x, ViT patch tokens 16x16x384 1.8-1.9x and
    16x16x1024 0.8x (float32: the int8 pass's fixed costs and the recounts would make the policy no
    faster). On an AVX2 EPYC int8 was never faster, and float32 was the default.

    GPUs take float32: there the reductions over each similarity tile bound the engine, not the products,
    and the int8 pass alone was slower than all of float32 (H200, K = 100 at 61x61x128: 25.4 ms against
    15.2 ms; README "GPU check")."""
    if device.type != "cpu":
        return Precision.FLOAT32
    fast_int8 = int8_speedup(device, map_shape or CALIBRATION_SHAPE) >= INT8_DEFAULT_MIN_SPEEDUP
    return Precision.INT8_FLOAT32 if fast_int8 else Precision.FLOAT32


def int8_speedup(device: torch.device, map_shape: Sequence[int]) -> float:
    """How many times faster the engine matches maps of this shape in int8 than in float32 on this CPU:
    timed through the C kernels where both run (quantization included), else the torch GEMMs' ratio
    (timed once per process)."""
    if native.native_enabled(device, Precision.INT8) and native.native_enabled(device, Precision.FLOAT32):
        return _engine_int8_speedup(tuple(int(n) for n in map_shape))
    return kernels.int8_gemm_speedup(device)


@functools.cache
def _engine_int8_speedup(map_shape: tuple[int, int, int]) -> float:
    """float32 time over int8 time of one query against a few candidates (best of three; about 0.2 s
    once per process and shape). Two candidates at 61x61x128, more for smaller maps (up to 32, as many
    as give the same products), so that per-call costs weigh as they do in a re-ranking."""
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    h, w, channels = map_shape
    k = min(32, max(2, round(2 * CALIBRATION_PRODUCTS / ((h * w) ** 2 * channels))))
    query = torch.nn.functional.normalize(torch.randn(h * w, channels, generator=gen), dim=-1)
    cands = DenseMaps(torch.nn.functional.normalize(torch.randn(k, h, w, channels, generator=gen), dim=-1))
    seconds = {
        precision: _best_time(lambda p=precision: best_matches(query, cands, p, cpu, None))
        for precision in (Precision.FLOAT32, Precision.INT8)
    }
    return seconds[Precision.FLOAT32] / seconds[Precision.INT8]


def _best_time(fn: Callable[[], object], rounds: int = 3) -> float:
    fn()  # warm-up: the first call starts the thread pool
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def resolve_precision(
    precision: str | Precision | None, device: torch.device, map_shape: Sequence[int] | None = None
) -> Precision:
    """The precision asked for, or the default for this device and map shape (h, w, C)."""
    if precision is None:
        return default_precision(device, map_shape)
    try:
        return Precision(precision)
    except ValueError:
        raise ValueError(
            f"unknown precision {precision!r}; expected one of {[p.value for p in Precision]}"
        ) from None
