"""The similarity GEMMs of the MNN engine: one prepared query against tiles of candidate rows.

Each precision has one kernel per query; operands a GEMM wants packed (oneDNN's blocked weight layout)
are packed once per query, not once per tile. Every float kernel adds a zero bias in the GEMM's
epilogue: free, and it turns -0.0 into +0.0, which the float reducer's bit-pattern keys rely on.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.matching.precision import Precision

# int8 through a float32 GEMM: integer values plus this bias give 1.5 * 2^23 + dot exactly
# (|dot| < 2^22, see precision.int8_limit), whose bit pattern read as int32 is INT_OFFSET + dot: the
# exact integer without a float -> int conversion pass (several times slower than the GEMM on CPU).
MAGIC_BIAS = 1.5 * 2**23
INT_OFFSET = 0x4B400000

# Set SELAVPR_INT8_GEMM=int|float to skip the calibration (both routes give identical results).
INT8_ROUTE_ENV = "SELAVPR_INT8_GEMM"

Gemm = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SimilarityKernel:
    """rows (k, r, C) -> similarities (k, r, L_q) against a prepared query. int8 tiles are int32 and
    hold `int_offset + dot`; float tiles are float32 without negative zeros."""

    fn: Gemm
    int_offset: int = 0

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.fn(rows)


def similarity_kernel(query: torch.Tensor, precision: Precision) -> SimilarityKernel:
    """The GEMM for one prepared query (L_q, C): int8 values for INT8, else the precision's dtype."""
    if precision is Precision.INT8:
        if int8_route(query.device) == "float":
            return SimilarityKernel(_int_via_float(query), INT_OFFSET)
        q_t = query.T  # a transposed view: the GEMMs take it without a copy
        return SimilarityKernel(
            lambda rows: int8_matmul(rows.reshape(-1, rows.shape[-1]), q_t).view(*rows.shape[:2], -1)
        )
    zero = torch.zeros(query.shape[0], device=query.device)
    if precision is Precision.FLOAT32:
        return SimilarityKernel(_float_gemm(query, zero))
    q_t = query.T
    return SimilarityKernel(lambda rows: torch.add(torch.matmul(rows, q_t), zero))  # 16-bit -> float32


def _int_via_float(query: torch.Tensor) -> Gemm:
    bias = torch.full((query.shape[0],), MAGIC_BIAS, device=query.device)
    exact = _float_gemm(query.float(), bias)  # integer values: every partial sum is exact
    return lambda rows: exact(rows.float()).view(torch.int32)


def _float_gemm(query: torch.Tensor, bias: torch.Tensor) -> Gemm:
    """rows (k, r, C) -> rows @ query^T + bias in float32: oneDNN with the query packed once on CPU."""
    if query.device.type == "cpu" and _onednn_float32_works(query.shape[1]):
        packed = torch.ops.mkldnn._reorder_linear_weight(query, None)
        return lambda rows: torch.ops.mkldnn._linear_pointwise(
            rows.reshape(-1, rows.shape[-1]), packed, bias, "none", [], ""
        ).view(*rows.shape[:2], -1)
    q_t = query.T
    return lambda rows: torch.addmm(bias, rows.reshape(-1, rows.shape[-1]), q_t).view(*rows.shape[:2], -1)


@functools.cache
def _onednn_float32_works(channels: int) -> bool:
    """oneDNN's packed-weight GEMM runs float32 about 1.5-2x faster than torch.matmul on the project's
    CPUs (torch's private inductor ops). Used only if present and bit-identical to torch.mm here, for
    this channel count: on a Xeon with AMX it was up to 384 channels and not from 768 on (another
    summation order)."""
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(67, channels, generator=gen), torch.randn(301, channels, generator=gen)
        packed = torch.ops.mkldnn._reorder_linear_weight(b, None)
        out = torch.ops.mkldnn._linear_pointwise(a, packed, torch.zeros(301), "none", [], "")
        return torch.equal(out, torch.mm(a, b.T))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def int8_route(device: torch.device) -> str:
    """How int8 products are computed on this device: "int" (torch._int_mm: VNNI / AMX on CPU, int8
    tensor cores on GPU) or "float" (a float32 GEMM of the integer values, exact below 2^24). Both give
    identical int32 results; only speed differs. CUDA takes "int"; a CPU the faster of the two on an
    engine-sized tile, measured once per process: without VNNI torch._int_mm runs a scalar loop (about
    1 GOP/s on an AVX2 EPYC against 30-50 GFLOP/s for the float GEMM)."""
    forced = os.environ.get(INT8_ROUTE_ENV)
    if forced in ("int", "float"):
        return forced
    if device.type != "cpu":
        return "int"
    return _cpu_int8_route()


def int8_gemm_speedup(device: torch.device) -> float:
    """How many times faster int8 products run than float32 ones here: measured once per process on
    CPU (1.0 when the float route is used anyway); taken as large on CUDA (int8 tensor cores)."""
    if device.type != "cpu":
        return math.inf
    int_s, float_s = _cpu_gemm_times()
    return float_s / int_s if int8_route(device) == "int" else 1.0


def _cpu_int8_route() -> str:
    int_s, float_s = _cpu_gemm_times()
    return "int" if int_s < float_s else "float"


@functools.cache
def _cpu_gemm_times() -> tuple[float, float]:
    """Seconds of torch._int_mm and of the float route on the same int8 tile (best of a few)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (1, 256, 128), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (1024, 128), dtype=torch.int8, generator=gen)
    via_float = _int_via_float(b)
    float_s = _best_time(lambda: via_float(a))
    try:
        return _best_time(lambda: torch._int_mm(a[0], b.T)), float_s
    except (RuntimeError, AttributeError, NotImplementedError):
        return math.inf, float_s


def _best_time(fn: Callable[[], object], rounds: int = 3) -> float:
    fn()  # warm-up: first calls allocate and dispatch
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


_INT_MM_WORKS: dict[str, bool] = {}


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, C) int8 @ (C, N) int8 -> (M, N) exact int32, on int8 hardware paths where torch has them.
    Fallback: float32 matmul of the int8 values, exact because `int8_limit` keeps every partial sum
    below 2^22."""
    kind = a.device.type
    if _INT_MM_WORKS.get(kind, True):
        try:
            return _int_mm_padded(a, b)
        except (RuntimeError, AttributeError, NotImplementedError):
            _INT_MM_WORKS[kind] = False
    return torch.matmul(a.float(), b.float()).to(torch.int32)


def _int_mm_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.device.type != "cuda":
        return torch._int_mm(a, b)
    m, n = a.shape[0], b.shape[1]
    return torch._int_mm(*pad_for_cublas_int8(a, b))[:m, :n]


def pad_for_cublas_int8(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cuBLASLt int8 wants M > 16 and K, N multiples of 8: zero padding, which adds nothing to the
    products that are kept (the caller slices them back)."""
    m, c = a.shape
    n = b.shape[1]
    pm, pc, pn = max(m, 17), -(-c // 8) * 8, -(-n // 8) * 8
    a = torch.nn.functional.pad(a, (0, pc - c, 0, pm - m))
    b = torch.nn.functional.pad(b, (0, pn - n, 0, pc - c))
    return a, b.contiguous()
