"""Which precision a device computes MNN counts in by default: a choice that depends on the kernels the
device has (model.matching.native's C kernels on CPUs, else model.matching.kernels), made once here.
Never bfloat16 (emulated on most CPUs) and never a mode slower than float32 where it was measured."""

from __future__ import annotations

from collections.abc import Sequence

import torch

import model.matching.kernels as kernels
import model.matching.native as native
from model.matching.precision import Precision

# Without the C kernels (torch tiles): int8+float32 becomes the default only where int8 products run at
# least this many times faster than float32 ones; one int8 pass plus K/4 float32 recounts (refine.py)
# then stays below float32 alone.
INT8_DEFAULT_MIN_SPEEDUP = 2.0

# With the C kernels the choice follows the int8 kernel and the maps' size, so that every process of a
# service makes the same one (a timed choice could differ between processes, and their answers with it).
# Per int8 kernel's instruction set (native.KERNELS), the multiply-adds per pair of maps from which int8 is
# the default; kernels not listed are never the default. Measured with bench/rerank.py "int8_speedup"
# (float32 time over int8 time, quantization included; docs: re-ranking engine): on a 2-core Xeon with
# AMX 3.7-5.5x at 61x61x128 (1.8e9 multiply-adds per pair of maps), about 3x at 32x32x768 (8.1e8),
# 1.8-1.9x at 16x16x384 (2.5e7) and 0.8x at 16x16x1024 (6.7e7), where per-call costs eat the gain: at
# 1.9x the policy took 1.1x float32's time on the shared images' patch tokens; AVX-512 VNNI 2.7x at
# 61x61x128; AVX-VNNI 1.5-3x (the Xeon capped at it, loaded). AVX2 without VNNI (vpmaddubsw) is not
# listed: 0.6-1.25x its float32 kernel (it issues as many vector operations per product as FMA does).
# The ARM kernels are not listed: not measured on ARM.
NATIVE_INT8_MIN_PRODUCTS = {"amx": 2**28, "avx512": 2**28, "avx_vnni": 2**28}

# The map shape the default is decided on when the caller gives none: SelaVPR's local head at 224 px.
DEFAULT_MAP_SHAPE = (61, 61, 128)


def default_precision(device: torch.device, map_shape: Sequence[int] | None = None) -> Precision:
    """int8+float32 on CPUs where int8 matching of maps of this shape (h, w, C) is well ahead of
    float32, else exact float32: with the C kernels, maps of at least NATIVE_INT8_MIN_PRODUCTS of the
    int8 kernel's instruction set multiply-adds per pair (the 61x61x128 local head's, not ViT patch
    tokens at 224 px; never with AVX2's or ARM's int8 kernels); with the
    torch tiles, int8 products at least twice as fast as float32's (timed once per process; on an AVX2
    EPYC they never were).

    GPUs take float32: there the reductions over each similarity tile bound the engine, not the products,
    and the int8 pass alone was slower than all of float32 (H200, K = 100 at 61x61x128: 25.4 ms against
    15.2 ms; docs/benchmarks.md, "GPU check")."""
    if device.type != "cpu":
        return Precision.FLOAT32
    h, w, channels = map_shape or DEFAULT_MAP_SHAPE
    if native.native_enabled(device, Precision.INT8) and native.native_enabled(
        device, Precision.FLOAT32, channels
    ):
        int8_kernel = native.kernel_for(Precision.INT8)
        min_products = NATIVE_INT8_MIN_PRODUCTS.get(int8_kernel.isa) if int8_kernel else None
        fast_int8 = min_products is not None and (h * w) ** 2 * channels >= min_products
    else:
        fast_int8 = kernels.int8_gemm_speedup(device) >= INT8_DEFAULT_MIN_SPEEDUP
    return Precision.INT8_FLOAT32 if fast_int8 else Precision.FLOAT32


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
