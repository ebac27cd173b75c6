"""The engine's inner loop on CPU in C (`_mnn_cpu.c`): similarities of one query against a batch of
candidate maps, reduced to both argmaxes while they are still in registers or L1.

The torch tiles write every similarity tile to memory and read it back for each reduction; on a CPU
with AVX-512 that traffic, not the products, bounds them. Here a similarity never leaves the core.

- float32 (AVX-512 FMA): equal to the tiles and to the authors' torch.matmul to the bit, where this
  CPU's torch.mm sums in the kernel's order (checked once per process before use,
  `_float32_matches_torch`; otherwise float32 runs on the tiles).
- int8 (AMX tiles where the CPU has them, else AVX-512 VNNI): exact integer products, equal to the tiles.
- bfloat16 (AMX): similarities summed in float32 from bfloat16 operands, not rounded to 16 bits as the
  tiles' GEMM rounds them (like the GPU's fused kernel), so a few argmaxes differ from the tiles'.

Ties go to the lowest index on both sides. Built at install time as an optional extension
(pyproject.toml); where it did not build, the CPU lacks the instructions, or SELAVPR_NATIVE_MNN=0, the
engine runs its tiles (SELAVPR_NATIVE_AMX=0: no AMX). Candidate positions are split between threads
(torch.get_num_threads()); ctypes releases the GIL.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from model.matching.precision import Precision

log = logging.getLogger(__name__)

NATIVE_ENV = "SELAVPR_NATIVE_MNN"
AMX_ENV = "SELAVPR_NATIVE_AMX"  # 0: no AMX kernels (int8 then runs on AVX-512 VNNI, bfloat16 on the tiles)
CAP_FLOAT32, CAP_INT8, CAP_INT8_AMX, CAP_BF16_AMX = 1, 2, 4, 8  # selavpr_mnn_caps() bits
AMX_INT8, AMX_BF16 = 0, 1  # selavpr_mnn_amx's kinds
ABI = 1  # selavpr_mnn_abi() of the library these declarations fit
LANES, TILE_POSITIONS = 16, 32
TILE_ROWS = 48  # a multiple of the kernels' rows per micro-tile (8 float32, 6 int8 VNNI, 16 AMX)

NativeMatcher = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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


def describe() -> str:
    """Which kernels this process matches with on CPU, for the logs."""
    caps = _caps() if os.environ.get(NATIVE_ENV, "1") != "0" else 0
    if not caps:
        return "torch tiles (no C kernels here)"
    names = ["float32"] if caps & CAP_FLOAT32 else []
    if caps & (CAP_INT8 | CAP_INT8_AMX):
        names.append("int8 on AMX" if caps & CAP_INT8_AMX else "int8 on VNNI")
    if caps & CAP_BF16_AMX:
        names.append("bfloat16 on AMX")
    return "C kernels: " + ", ".join(names)


def _declare(lib: ctypes.CDLL) -> None:
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    outputs = [i64, i32, i32, i32, i32, p, p, p]  # k, l_c, channels or row bytes, i0, i1, 3 outputs
    lib.selavpr_mnn_caps.restype = i32
    lib.selavpr_mnn_caps.argtypes = []
    for name, inputs in (
        ("selavpr_mnn_f32", [p, i32, i32, p]),
        ("selavpr_mnn_i8", [p, p, i32, i32, p]),
        ("selavpr_mnn_amx", [i32, p, i32, i32, p]),
    ):
        getattr(lib, name).restype = i32
        getattr(lib, name).argtypes = inputs + outputs


def _caps() -> int:
    lib = _library()
    caps = lib.selavpr_mnn_caps() if lib is not None else 0
    return caps & ~(CAP_INT8_AMX | CAP_BF16_AMX) if os.environ.get(AMX_ENV, "1") == "0" else caps


def native_available(precision: Precision, channels: int = 128) -> bool:
    """Whether this process can run a C kernel for `precision` on maps of `channels` (built, the CPU
    has the instructions: AVX-512 for float32, VNNI or AMX for int8, AMX for bfloat16; float32 only
    where its bits are torch's for this channel count); SELAVPR_NATIVE_MNN=0 turns them off."""
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return False
    needs = {
        Precision.FLOAT32: CAP_FLOAT32,
        Precision.INT8: CAP_INT8 | CAP_INT8_AMX,
        Precision.BFLOAT16: CAP_BF16_AMX,
    }.get(precision, 0)
    if not _caps() & needs:
        return False
    return precision is not Precision.FLOAT32 or _float32_matches_torch(channels)


def native_enabled(device: torch.device, precision: Precision, channels: int = 128) -> bool:
    return device.type == "cpu" and native_available(precision, channels)


def amx_enabled() -> bool:
    """Whether int8 runs on AMX tiles (CPUs with AMX, unless SELAVPR_NATIVE_AMX=0) rather than VNNI."""
    return bool(_caps() & CAP_INT8_AMX)


@dataclass
class _Query:
    """A query packed for one kernel: `kind` float32 | int8 | int8_amx | bfloat16_amx."""

    kind: str
    packed: torch.Tensor
    lq: int
    channel_multiple: int  # candidates' channels are zero-padded to a multiple of this
    bias: torch.Tensor | None = None  # the VNNI kernel's (see _pack)

    @property
    def lq_pad(self) -> int:
        return self.packed.shape[0] * LANES


def native_matcher(query: torch.Tensor, precision: Precision) -> NativeMatcher:
    """For a prepared query (L_q, C) (float32, int8 from quantize_int8, or bfloat16): chunk (k, L_c, C)
    prepared the same way -> (best_c_of_q (k, L_q) int64, best_q_of_c (k, L_c) int64)."""
    prepared = _prepare_query(query, precision)
    return lambda chunk: _run(chunk, prepared)[:2]


def _prepare_query(query: torch.Tensor, precision: Precision) -> _Query:
    lq = query.shape[0]
    lq_pad = -(-lq // TILE_POSITIONS) * TILE_POSITIONS
    if precision is Precision.BFLOAT16:  # 32 bfloat16 channels per 64-byte tile row, in pairs
        padded = _padded_channels(query.contiguous(), 32)
        return _Query("bfloat16_amx", _pack(padded, lq_pad, group=2), lq, 32)
    if precision is Precision.INT8:
        # The VNNI kernel's bias, -128 * the sum of each query vector's components, cancels the +128
        # that makes its candidate bytes unsigned (AMX multiplies signed bytes).
        amx = amx_enabled()
        padded = _padded_channels(query.contiguous(), 64 if amx else 4)
        bias = torch.zeros(lq_pad, dtype=torch.int32)
        bias[:lq] = -128 * padded.sum(dim=1, dtype=torch.int32)
        kind = "int8_amx" if amx else "int8"
        return _Query(kind, _pack(padded, lq_pad, group=4), lq, 64 if amx else 4, None if amx else bias)
    return _Query("float32", _pack(query.float(), lq_pad, group=1), lq, 1)


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
    if query.kind == "float32":
        chunk = chunk.float()
    chunk = _padded_channels(chunk.contiguous(), query.channel_multiple)
    k, lc, channels = chunk.shape
    lq, lq_pad = query.lq, query.lq_pad
    parts = _row_ranges(lc, torch.get_num_threads())
    row_arg = torch.empty(k, lc, dtype=torch.int32)
    value_dtype = torch.float32 if query.kind == "float32" else torch.int32
    col_val = torch.empty(len(parts), k, lq_pad, dtype=value_dtype)
    col_arg = torch.empty(len(parts), k, lq_pad, dtype=torch.int32)
    lib = _library()
    row_bytes = channels * chunk.element_size()

    def part(t: int) -> int:
        i0, i1 = parts[t]
        outs = (i0, i1, row_arg.data_ptr(), col_val[t].data_ptr(), col_arg[t].data_ptr())
        q, maps = query.packed.data_ptr(), chunk.data_ptr()
        if query.kind == "float32":
            return lib.selavpr_mnn_f32(q, lq, lq_pad, maps, k, lc, channels, *outs)
        if query.kind == "int8":
            return lib.selavpr_mnn_i8(q, query.bias.data_ptr(), lq, lq_pad, maps, k, lc, channels, *outs)
        kind = AMX_INT8 if query.kind == "int8_amx" else AMX_BF16
        return lib.selavpr_mnn_amx(kind, q, lq, lq_pad, maps, k, lc, row_bytes, *outs)

    codes = list(_pool().map(part, range(len(parts)))) if len(parts) > 1 else [part(0)]
    if -2 in codes:
        raise RuntimeError(f"the {query.kind} kernel needs AMX, which this CPU or kernel does not allow")
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


@functools.cache
def _float32_matches_torch(channels: int) -> bool:
    """The kernel's float32 argmaxes depend on its products' bits; use it only where they are torch's
    for this channel count: the best similarity of every query position bit for bit, and both
    argmaxes, on maps with many exact ties (coarsely rounded values) and on random maps. On a Xeon with
    AMX torch.matmul summed in the kernel's order up to 384 channels, and not from 768 on."""
    gen = torch.Generator().manual_seed(0)
    for coarse in (True, False):
        query = torch.randn(97, channels, generator=gen)
        cands = torch.randn(3, 61, channels, generator=gen)
        if coarse:
            query, cands = torch.round(query * 2) / 2, torch.round(cands * 2) / 2
        sim = torch.matmul(cands, query.T)
        best_c, best_q, best_value = _run(cands, _prepare_query(query, Precision.FLOAT32))
        if not (
            torch.equal(best_value, sim.amax(dim=1))
            and torch.equal(best_c, sim.argmax(dim=1))
            and torch.equal(best_q, sim.argmax(dim=2))
        ):
            return False
    return True
