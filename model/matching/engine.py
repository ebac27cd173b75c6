"""The tiled MNN core: each query position's best candidate position and each candidate position's best
query position, computed one tile of similarities at a time.

A tile is (candidates in a chunk) x (a block of candidate positions) x (all query positions). Row
argmaxes (best query position of a candidate position) are final within a tile; column maxima (best
candidate position of a query position) are carried across tiles. Ties go to the lowest index on both
sides, as torch.argmax decides, also across tiles.

Index-returning reductions (argmax, max(dim)) are several times slower on CPU than value reductions
(amax), so int8 similarities (exact int32) carry the position index in their low bits,
`dot * 2^b + (2^b - 1 - idx)`, and one amax finds the maximum and its lowest index together. Float
similarities cannot spare the bits and use argmax / max(dim).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from model.matching.maps import CandidateMaps
from model.matching.precision import FLOAT_DTYPES, Precision, index_bits, quantize_int8

INT32_MIN = torch.iinfo(torch.int32).min
# Similarity elements per tile: 8 MiB on CPU (a sweep on the project machine: 2, 4 and 8 MiB within
# noise, 8 the steadiest); GPUs want big tiles.
DEFAULT_TILE_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 26}


@dataclass
class BestMatches:
    best_c_of_q: torch.Tensor  # (K, L_q) int64: argmax_i S[i, j]
    best_q_of_c: torch.Tensor  # (K, L_c) int64: argmax_j S[i, j]

    def mutual(self) -> torch.Tensor:
        """(K, L_q) bool: query position j is a mutual nearest neighbour of its best candidate position."""
        back = torch.gather(self.best_q_of_c, 1, self.best_c_of_q)
        return back == torch.arange(back.shape[1], device=back.device)


def best_matches(
    query: torch.Tensor,
    cands: CandidateMaps,
    precision: Precision,
    device: torch.device,
    tile_elements: int | None,
) -> BestMatches:
    """query (L_q, C) float and K candidate maps (loaded a chunk at a time), on any device ->
    BestMatches on `device`."""
    if precision is Precision.INT8_FLOAT32:
        raise ValueError("int8+float32 is a policy over candidates (mnn_scores), not an engine precision")
    k_total = len(cands)
    h, w, channels = cands.map_shape
    l_c, l_q = h * w, query.shape[0]
    bits = index_bits(l_q, l_c)
    budget = tile_elements or DEFAULT_TILE_ELEMENTS.get(device.type, DEFAULT_TILE_ELEMENTS["cuda"])
    k_step, r_step = tile_shape(k_total, l_c, l_q, budget)
    kernel = similarity_kernel(_prepare(query.to(device)[None], precision, bits)[0], precision)
    reducer = (
        PackedIntReducer(l_q, r_step, bits, device)
        if precision is Precision.INT8
        else FloatReducer(l_q, device)
    )
    best_c_of_q = torch.empty(k_total, l_q, dtype=torch.int64, device=device)
    best_q_of_c = torch.empty(k_total, l_c, dtype=torch.int64, device=device)
    for k0 in range(0, k_total, k_step):
        loaded = cands.load(slice(k0, k0 + k_step)).reshape(-1, l_c, channels)
        chunk = _prepare(loaded.to(device, non_blocking=True), precision, bits)
        reducer.start(chunk.shape[0], l_c)
        for i0 in range(0, l_c, r_step):
            reducer.update(kernel(chunk[:, i0 : i0 + r_step]), i0)
        best_c_of_q[k0 : k0 + chunk.shape[0]], best_q_of_c[k0 : k0 + chunk.shape[0]] = reducer.finish()
    return BestMatches(best_c_of_q, best_q_of_c)


def tile_shape(k: int, l_c: int, l_q: int, tile_elements: int) -> tuple[int, int]:
    """(candidates per chunk, candidate positions per tile) with k_step * r_step * l_q <= budget."""
    rows = max(1, tile_elements // max(l_q, 1))
    if rows >= l_c:
        return max(1, min(k, rows // l_c)), l_c
    return 1, rows


def _prepare(maps: torch.Tensor, precision: Precision, bits: int) -> torch.Tensor:
    if precision is Precision.INT8:
        return quantize_int8(maps, bits)
    return maps.to(FLOAT_DTYPES[precision]).contiguous()


def similarity_kernel(query: torch.Tensor, precision: Precision):
    """A function rows (k, r, C) -> similarities (k, r, L_q) against the prepared query (L_q, C):
    int32 for int8, float32 otherwise."""
    q_t = query.T  # a transposed view: the GEMMs take it without a copy
    if precision is Precision.INT8:
        return lambda rows: int8_matmul(rows.reshape(-1, rows.shape[-1]), q_t).view(*rows.shape[:2], -1)
    if precision is Precision.FLOAT32 and query.device.type == "cpu" and _onednn_float32_works():
        packed = torch.ops.mkldnn._reorder_linear_weight(query, None)
        return lambda rows: torch.ops.mkldnn._linear_pointwise(
            rows.reshape(-1, rows.shape[-1]), packed, None, "none", [], ""
        ).view(*rows.shape[:2], -1)
    return lambda rows: torch.matmul(rows, q_t).float()


@functools.cache
def _onednn_float32_works() -> bool:
    """oneDNN's packed-weight GEMM runs float32 about 1.8x faster than torch.matmul on the project's
    CPU (torch's private inductor ops). Used only if present and bit-identical to torch.mm here."""
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(67, 128, generator=gen), torch.randn(301, 128, generator=gen)
        packed = torch.ops.mkldnn._reorder_linear_weight(b, None)
        out = torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
        return torch.equal(out, torch.mm(a, b.T))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


_INT_MM_WORKS: dict[str, bool] = {}


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, C) int8 @ (C, N) int8 -> (M, N) exact int32, on int8 hardware paths where torch has them.
    Fallback: float32 matmul of the int8 values, exact because `int8_limit` keeps every partial sum
    below 2^24."""
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


class PackedIntReducer:
    """Reductions over int32 similarity tiles with the position index packed into the low bits."""

    def __init__(self, l_q: int, r_step: int, bits: int, device: torch.device) -> None:
        self.bits = bits
        self.mask = (1 << bits) - 1
        self.rev_j = (self.mask - torch.arange(l_q, dtype=torch.int32, device=device)).view(1, 1, -1)
        rev_i = self.mask - torch.arange(r_step, dtype=torch.int32, device=device)
        self.delta = rev_i.view(-1, 1) - self.rev_j[0]  # turns a row-packed key into a column-packed one
        self.device = device

    def start(self, k: int, l_c: int) -> None:
        self.row_key = torch.empty(k, l_c, dtype=torch.int32, device=self.device)
        self.col_key = torch.full((k, self.rev_j.shape[-1]), INT32_MIN, dtype=torch.int32, device=self.device)

    def update(self, sim: torch.Tensor, i0: int) -> None:
        r = sim.shape[1]
        key = torch.add(self.rev_j, sim, alpha=1 << self.bits, out=sim)  # dot * 2^b + (2^b - 1 - j)
        self.row_key[:, i0 : i0 + r] = key.amax(dim=2)
        key.add_(self.delta[:r])  # now dot * 2^b + (2^b - 1 - i_local)
        torch.maximum(self.col_key, key.amax(dim=1) - i0, out=self.col_key)  # i_local -> i0 + i_local

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        best_c_of_q = self.mask - (self.col_key & self.mask)
        best_q_of_c = self.mask - (self.row_key & self.mask)
        return best_c_of_q.long(), best_q_of_c.long()


class FloatReducer:
    """Reductions over float similarity tiles with torch.max, which returns the first maximal index."""

    def __init__(self, l_q: int, device: torch.device) -> None:
        self.l_q = l_q
        self.device = device

    def start(self, k: int, l_c: int) -> None:
        self.row_arg = torch.empty(k, l_c, dtype=torch.int64, device=self.device)
        self.col_max = torch.full((k, self.l_q), -torch.inf, dtype=torch.float32, device=self.device)
        self.col_arg = torch.zeros(k, self.l_q, dtype=torch.int64, device=self.device)

    def update(self, sim: torch.Tensor, i0: int) -> None:
        self.row_arg[:, i0 : i0 + sim.shape[1]] = sim.argmax(dim=2)
        tile_max, tile_arg = sim.max(dim=1)
        better = tile_max > self.col_max  # strict: an earlier tile keeps a tie
        self.col_max = torch.where(better, tile_max, self.col_max)
        self.col_arg = torch.where(better, tile_arg + i0, self.col_arg)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.col_arg, self.row_arg
