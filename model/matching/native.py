"""The engine's inner loop on CPU in C (`_mnn_cpu.c` for x86-64, `_mnn_arm.c` for ARM): similarities of
one query against a batch of candidate maps, reduced to both argmaxes while they are still in registers
or L1.

The torch tiles write every similarity tile to memory and read it back for each reduction; on CPUs with
wide vectors that traffic, not the products, bounds them. Here a similarity never leaves the core.

KERNELS is the one table of which kernel runs where: for each precision, the kernels in order of
preference with the CPU feature each needs (reported by the library's selavpr_mnn_caps()); the first
whose feature this CPU has, within SELAVPR_NATIVE_ISA, runs.

- float32 (AVX-512, AVX2 or NEON FMA): equal to the tiles and to the authors' torch.matmul to the bit,
  where this CPU's torch.mm sums in the kernel's order (checked once per process and kernel before use,
  `_float32_matches_torch`; otherwise float32 runs on the tiles).
- int8 (AMX, AVX-512 VNNI, AVX-VNNI, AVX2, ARM i8mm or dot product): exact integer products, equal to
  the tiles.
- bfloat16 (AMX): similarities summed in float32 from bfloat16 operands, not rounded to 16 bits as the
  tiles' GEMM rounds them (like the GPU's fused kernel), so a few argmaxes differ from the tiles'.

Ties go to the lowest index on both sides. Built at install time as an optional extension
(pyproject.toml); where it did not build, the CPU lacks the instructions, or SELAVPR_NATIVE_MNN=0, the
engine runs its tiles. SELAVPR_NATIVE_ISA caps the instruction sets used (x86-64: avx2, avx_vnni,
avx512, amx; ARM: neon, dotprod, i8mm), e.g. to run the AVX2 kernels on an AVX-512 CPU;
SELAVPR_NATIVE_AMX=0 is the older spelling of avx512. Candidate positions are split between threads
(torch.get_num_threads()); ctypes releases the GIL.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import logging
import os
import platform
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from model.matching.precision import Precision

log = logging.getLogger(__name__)

NATIVE_ENV = "SELAVPR_NATIVE_MNN"
ISA_ENV = "SELAVPR_NATIVE_ISA"
AMX_ENV = "SELAVPR_NATIVE_AMX"  # 0: no AMX kernels (as SELAVPR_NATIVE_ISA=avx512)
# selavpr_mnn_caps() bits: CPU features (_mnn_driver.h)
CAP_AVX2, CAP_AVX_VNNI, CAP_AVX512, CAP_AVX512_VNNI, CAP_AMX_INT8, CAP_AMX_BF16 = (1 << b for b in range(6))
CAP_NEON, CAP_DOTPROD, CAP_I8MM = 1 << 6, 1 << 7, 1 << 8
ABI = 2  # selavpr_mnn_abi() of the library these declarations fit
QUANTIZE_SYMBOL = "selavpr_quantize_i8"  # quantize_int8's elementwise pass (absent from older builds)
LANES, TILE_POSITIONS = 16, 32
TILE_ROWS = 48  # a multiple of every kernel's rows per micro-tile (4, 6, 8, 16)

# The instruction-set levels SELAVPR_NATIVE_ISA names, lowest first, per architecture.
ISA_LEVELS = {"x86_64": ("avx2", "avx_vnni", "avx512", "amx"), "aarch64": ("neon", "dotprod", "i8mm")}

NativeMatcher = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Packing:
    """How a kernel takes the query: [L_q_pad / 16][C / group][16][group] values, channels zero-padded
    to a multiple of `channel_multiple`; `bias`: the VNNI kernels' (see _prepare_query)."""

    group: int
    channel_multiple: int
    bias: bool = False
    no_minus_128: bool = False  # the AVX2 int8 kernel's query is in [-127, 127] (see _mnn_cpu.c)


@dataclass(frozen=True)
class Kernel:
    """One C kernel: `symbol` in the library, run for `precision` where the CPU has `feature` (a caps
    bit) and SELAVPR_NATIVE_ISA allows `isa`."""

    name: str
    precision: Precision
    symbol: str
    feature: int
    isa: str
    packing: Packing


FP32, VNNI = Packing(group=1, channel_multiple=1), Packing(group=4, channel_multiple=4, bias=True)
F32, I8, BF16 = Precision.FLOAT32, Precision.INT8, Precision.BFLOAT16

# In order of preference per precision: the first one present runs.
# fmt: off
KERNELS = (
    Kernel("float32 on AVX-512", F32, "selavpr_mnn_f32_avx512", CAP_AVX512, "avx512", FP32),
    Kernel("float32 on AVX2", F32, "selavpr_mnn_f32_avx2", CAP_AVX2, "avx2", FP32),
    Kernel("float32 on NEON", F32, "selavpr_mnn_f32_neon", CAP_NEON, "neon", FP32),
    Kernel("int8 on AMX", I8, "selavpr_mnn_i8_amx", CAP_AMX_INT8, "amx", Packing(4, 64)),
    Kernel("int8 on AVX-512 VNNI", I8, "selavpr_mnn_i8_avx512vnni", CAP_AVX512_VNNI, "avx512", VNNI),
    Kernel("int8 on AVX-VNNI", I8, "selavpr_mnn_i8_avxvnni", CAP_AVX_VNNI, "avx_vnni", VNNI),
    Kernel("int8 on AVX2", I8, "selavpr_mnn_i8_avx2", CAP_AVX2, "avx2", Packing(4, 4, no_minus_128=True)),
    Kernel("int8 on i8mm", I8, "selavpr_mnn_i8_smmla", CAP_I8MM, "i8mm", Packing(8, 8)),
    Kernel("int8 on dot product", I8, "selavpr_mnn_i8_sdot", CAP_DOTPROD, "dotprod", Packing(4, 4)),
    Kernel("bfloat16 on AMX", BF16, "selavpr_mnn_bf16_amx", CAP_AMX_BF16, "amx", Packing(2, 32)),
)
# fmt: on


@functools.cache
def _library() -> ctypes.CDLL | None:
    here = Path(__file__).with_name("_mnn_cpu")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here.with_name(here.name + suffix)
        if path.is_file():
            lib = ctypes.CDLL(str(path))
            abi = getattr(lib, "selavpr_mnn_abi", None)
            if abi is None or abi() != ABI:
                log.warning(
                    "%s was built from another version of _mnn_cpu.c: `make install` rebuilds it", path
                )
                return None
            _declare(lib)
            return lib
    return None


def _declare(lib: ctypes.CDLL) -> None:
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.selavpr_mnn_caps.restype = i32
    lib.selavpr_mnn_caps.argtypes = []
    for kernel in KERNELS:
        fn = getattr(lib, kernel.symbol, None)  # only this architecture's kernels are in the library
        if fn is not None:
            fn.restype = i32
            # query, bias, L_q, L_q_pad, maps, k, L_c, channels, i0, i1, row_arg, col_val, col_arg
            fn.argtypes = [p, p, i32, i32, p, i64, i32, i32, i32, i32, p, p, p]
    if hasattr(lib, QUANTIZE_SYMBOL):
        # values, out, first element, end element, values per map, scales
        getattr(lib, QUANTIZE_SYMBOL).argtypes = [p, p, i64, i64, i64, p]
        getattr(lib, QUANTIZE_SYMBOL).restype = i32


def _cpu_features() -> int:
    lib = _library()
    return lib.selavpr_mnn_caps() if lib is not None else 0


def _isa_cap() -> str | None:
    """The highest instruction-set level allowed (SELAVPR_NATIVE_ISA, or SELAVPR_NATIVE_AMX=0), or None."""
    levels = ISA_LEVELS.get(_machine(), ())
    cap = os.environ.get(ISA_ENV, "").strip().lower() or None
    if cap is not None and cap not in levels:
        raise ValueError(f"{ISA_ENV}={cap!r}: expected one of {list(levels)} on this {_machine()} CPU")
    if os.environ.get(AMX_ENV, "1") == "0" and "avx512" in levels:
        cap = "avx512" if cap is None else levels[min(levels.index(cap), levels.index("avx512"))]
    return cap


def _machine() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _allowed(kernel: Kernel, cap: str | None) -> bool:
    levels = ISA_LEVELS.get(_machine(), ())
    if kernel.isa not in levels:
        return False
    return cap is None or levels.index(kernel.isa) <= levels.index(cap)


def dispatch_table() -> list[dict]:
    """Every kernel of KERNELS with whether this CPU has its feature, SELAVPR_NATIVE_ISA allows it, and
    it is the one that runs for its precision (printed by bench.rerank)."""
    on = os.environ.get(NATIVE_ENV, "1") != "0"
    features, cap = _cpu_features(), _isa_cap()
    chosen = {p: kernel_for(p) for p in {k.precision for k in KERNELS}}
    return [
        {
            "kernel": k.name,
            "precision": str(k.precision),
            "isa": k.isa,
            "cpu_has": bool(features & k.feature),
            "allowed": _allowed(k, cap),
            "runs": on and chosen[k.precision] == k,
        }
        for k in KERNELS
    ]


def kernel_for(precision: Precision) -> Kernel | None:
    """The kernel that runs `precision` here: the first of KERNELS this CPU has and the cap allows."""
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None
    features, cap = _cpu_features(), _isa_cap()
    for kernel in KERNELS:
        present = features & kernel.feature and hasattr(_library(), kernel.symbol)
        if kernel.precision is precision and present and _allowed(kernel, cap):
            return kernel
    return None


def describe() -> str:
    """Which kernels this process matches with on CPU, for the logs."""
    kernels = [
        k for k in (kernel_for(p) for p in (Precision.FLOAT32, Precision.INT8, Precision.BFLOAT16)) if k
    ]
    if not kernels:
        return "torch tiles (no C kernels here)"
    cap = _isa_cap()
    return "C kernels: " + ", ".join(k.name for k in kernels) + (f" ({ISA_ENV}={cap})" if cap else "")


def native_available(precision: Precision, channels: int = 128) -> bool:
    """Whether this process can run a C kernel for `precision` on maps of `channels` (built, the CPU
    has the instructions of one in KERNELS; float32 only where its bits are torch's for this channel
    count); SELAVPR_NATIVE_MNN=0 turns them off."""
    kernel = kernel_for(precision)
    if kernel is None:
        return False
    return precision is not Precision.FLOAT32 or _float32_matches_torch(channels)


def native_enabled(device: torch.device, precision: Precision, channels: int = 128) -> bool:
    return device.type == "cpu" and native_available(precision, channels)


def amx_enabled() -> bool:
    """Whether int8 runs on AMX tiles (CPUs with AMX, unless capped below amx)."""
    kernel = kernel_for(Precision.INT8)
    return kernel is not None and kernel.isa == "amx"


def quantize_int8(maps: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """quantize.quantize_int8's elementwise step for (n, ...) float32 maps on CPU and their (n,) scales,
    in one C pass split between threads: the bits of torch.mul(maps, scale).round_().clamp_(-127, 127)
    .to(torch.int8) without its four passes over float32 copies. None where the library lacks it or
    SELAVPR_NATIVE_MNN=0 (the caller runs the torch version)."""
    lib = _library() if os.environ.get(NATIVE_ENV, "1") != "0" else None
    if lib is None or not hasattr(lib, QUANTIZE_SYMBOL) or maps.device.type != "cpu" or maps.numel() == 0:
        return None
    values = maps.contiguous().float()
    scales = scales.contiguous().float()
    out = torch.empty(values.shape, dtype=torch.int8)
    per_map = values[0].numel()
    fn = getattr(lib, QUANTIZE_SYMBOL)

    def part(bounds: tuple[int, int]) -> int:
        return fn(values.data_ptr(), out.data_ptr(), *bounds, per_map, scales.data_ptr())

    parts = _element_ranges(values.numel(), torch.get_num_threads())
    if len(parts) > 1:
        list(_pool().map(part, parts))
    else:
        part(parts[0])
    return out


def _element_ranges(n: int, threads: int, minimum: int = 1 << 16) -> list[tuple[int, int]]:
    """[0, n) in at most `threads` ranges of at least `minimum` elements (a thread per few KiB costs more
    than it saves)."""
    count = max(1, min(threads, n // minimum))
    step = -(-n // count)
    return [(e0, min(e0 + step, n)) for e0 in range(0, n, step)]


@dataclass
class _Query:
    """A query packed for one kernel."""

    kernel: Kernel
    packed: torch.Tensor
    lq: int
    bias: torch.Tensor | None = None  # the VNNI kernels' (see _prepare_query)

    @property
    def lq_pad(self) -> int:
        return self.packed.shape[0] * LANES


def native_matcher(query: torch.Tensor, precision: Precision) -> NativeMatcher:
    """For a prepared query (L_q, C) (float32, int8 from quantize_int8, or bfloat16): chunk (k, L_c, C)
    prepared the same way -> (best_c_of_q (k, L_q) int64, best_q_of_c (k, L_c) int64)."""
    prepared = _prepare_query(query, precision)
    return lambda chunk: _run(chunk, prepared)[:2]


def _prepare_query(query: torch.Tensor, precision: Precision, kernel: Kernel | None = None) -> _Query:
    kernel = kernel or kernel_for(precision)
    if kernel is None:
        raise RuntimeError(f"no C kernel for {precision} on this CPU")
    packing = kernel.packing
    lq = query.shape[0]
    lq_pad = -(-lq // TILE_POSITIONS) * TILE_POSITIONS
    query = query.float() if precision is Precision.FLOAT32 else query
    padded = _padded_channels(query.contiguous(), packing.channel_multiple)
    if packing.no_minus_128 and bool((padded == -128).any()):
        raise ValueError(f"{kernel.name} takes int8 queries in [-127, 127] (quantize_int8's range)")
    bias = None
    if packing.bias:
        # -128 * the sum of each query vector's components cancels the +128 that makes the VNNI
        # kernels' candidate bytes unsigned.
        bias = torch.zeros(lq_pad, dtype=torch.int32)
        bias[:lq] = -128 * padded.sum(dim=1, dtype=torch.int32)
    return _Query(kernel, _pack(padded, lq_pad, packing.group), lq, bias)


def _pack(query: torch.Tensor, lq_pad: int, group: int) -> torch.Tensor:
    """(L_q, C) -> [L_q_pad / 16][C / group][16][group]: for each block of 16 query positions, `group`
    consecutive channels of each position together (4 bytes per lane: VNNI and AMX take them so)."""
    lq, channels = query.shape
    padded = torch.zeros(lq_pad, channels, dtype=query.dtype)
    padded[:lq] = query
    blocks = padded.view(lq_pad // LANES, LANES, channels // group, group)
    return blocks.permute(0, 2, 1, 3).contiguous()


def _padded_channels(maps: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero channels up to a multiple of `multiple`: they add nothing to any dot product."""
    extra = -maps.shape[-1] % multiple
    return torch.nn.functional.pad(maps, (0, extra)) if extra else maps


def _run(chunk: torch.Tensor, query: _Query) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> best_c_of_q (k, L_q), best_q_of_c (k, L_c), and each query position's best similarity (for
    float32; int32 dot products or order keys for the others)."""
    is_float = query.kernel.precision is Precision.FLOAT32
    if is_float:
        chunk = chunk.float()
    chunk = _padded_channels(chunk.contiguous(), query.kernel.packing.channel_multiple)
    k, lc, channels = chunk.shape
    lq, lq_pad = query.lq, query.lq_pad
    parts = _row_ranges(lc, torch.get_num_threads())
    row_arg = torch.empty(k, lc, dtype=torch.int32)
    col_val = torch.empty(len(parts), k, lq_pad, dtype=torch.float32 if is_float else torch.int32)
    col_arg = torch.empty(len(parts), k, lq_pad, dtype=torch.int32)
    kernel = getattr(_library(), query.kernel.symbol)
    bias = query.bias.data_ptr() if query.bias is not None else None

    def part(t: int) -> int:
        i0, i1 = parts[t]
        outs = (row_arg.data_ptr(), col_val[t].data_ptr(), col_arg[t].data_ptr())
        return kernel(
            query.packed.data_ptr(), bias, lq, lq_pad, chunk.data_ptr(), k, lc, channels, i0, i1, *outs
        )

    codes = list(_pool().map(part, range(len(parts)))) if len(parts) > 1 else [part(0)]
    if -2 in codes:
        raise RuntimeError(f"{query.kernel.name}: this CPU or its kernel does not allow the instructions")
    if any(codes):
        raise MemoryError("the native MNN kernel could not allocate its row buffers")
    best_c, best_value = _first_best(col_val[..., :lq], col_arg[..., :lq])
    return best_c, row_arg.long(), best_value


def _row_ranges(lc: int, threads: int) -> list[tuple[int, int]]:
    """Candidate rows split into at most `threads` ranges, in order, multiples of the tile's rows."""
    step = -(-lc // max(threads, 1))
    step = -(-step // TILE_ROWS) * TILE_ROWS
    return [(i0, min(i0 + step, lc)) for i0 in range(0, lc, step)]


def _first_best(values: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(parts, k, L_q) per-range bests -> (the first best row, its value): ranges come in row order,
    so on equal values the earliest range holds the lowest row."""
    best = values.amax(dim=0, keepdim=True)
    first = (values == best).int().argmax(dim=0, keepdim=True)
    return rows.gather(0, first)[0].long(), best[0]


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 1), thread_name_prefix="selavpr-mnn")


# A forked child has none of the pool's threads: it makes its own on first use.
os.register_at_fork(after_in_child=_pool.cache_clear)


def _float32_matches_torch(channels: int) -> bool:
    """The float32 kernel's argmaxes depend on its products' bits: use it only where they are torch's
    for this channel count (checked once per kernel and channel count)."""
    kernel = kernel_for(Precision.FLOAT32)
    return kernel is not None and _float32_bits_match(kernel, channels)


@functools.cache
def _float32_bits_match(kernel: Kernel, channels: int) -> bool:
    """The best similarity of every query position bit for bit, and both argmaxes, on maps with many
    exact ties (coarsely rounded values) and on random maps. On a Xeon with AMX torch.matmul summed in
    the kernels' order up to 384 channels, and not from 768 on."""
    gen = torch.Generator().manual_seed(0)
    for coarse in (True, False):
        query = torch.randn(97, channels, generator=gen)
        cands = torch.randn(3, 61, channels, generator=gen)
        if coarse:
            query, cands = torch.round(query * 2) / 2, torch.round(cands * 2) / 2
        sim = torch.matmul(cands, query.T)
        best_c, best_q, best_value = _run(cands, _prepare_query(query, Precision.FLOAT32, kernel))
        if not (
            torch.equal(best_value, sim.amax(dim=1))
            and torch.equal(best_c, sim.argmax(dim=1))
            and torch.equal(best_q, sim.argmax(dim=2))
        ):
            return False
    return True
