"""The tiled MNN core: each query position's best candidate position and each candidate position's best
query position, computed one tile of similarities at a time.

A tile is (candidates in a chunk) x (a block of candidate positions) x (all query positions). Row
argmaxes (best query position of a candidate position) are final within a tile; column maxima (best
candidate position of a query position) are carried across tiles. Ties go to the lowest index on both
sides, as torch.argmax decides, also across tiles.

The GEMMs are in kernels.py (operands packed once per query), the reductions in reducers.py (position
indices packed into int32 keys, so that value reductions find maxima and first indices together).
Where a fused kernel exists the tiles never reach memory: native.py on CPUs with AVX2, AVX-512, AMX
or ARM NEON (float32, int8; bfloat16 on AMX), fused.py on CUDA (16-bit, int8).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.matching.fused import fused_best_matches, fused_enabled
from model.matching.kernels import SimilarityKernel, similarity_kernel
from model.matching.maps import CandidateMaps
from model.matching.native import native_enabled, native_matcher
from model.matching.precision import FLOAT_DTYPES, Precision, index_bits
from model.matching.quantize import quantize_int8
from model.matching.reducers import BucketFloatReducer, FloatReducer, PackedIntReducer

# Similarity elements per tile: 8 MiB on CPU (sweeps on the project machine: 2-8 MiB within noise with
# the old reducers; with the packed-key reducers 0.25-2 MiB tiles ran 2-10x slower on the busy 2-core
# machine, per-call overhead outweighing cache residency); GPUs want big tiles.
DEFAULT_TILE_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 26}
# Candidates per call of a fused kernel. fused.py: 32 at 61x61x128 hold 61 MB of float32 maps and 28 MB
# of partials, and give the GPU 960 programs. native.py: the chunk only bounds the decoded maps.
FUSED_CHUNK = 32


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
    prepared_query = _prepare(query.to(device)[None], precision, bits)[0]
    fused = _fused_matcher(prepared_query, precision, device)
    if fused is not None:  # no tiles in memory: the chunk only bounds the loaded maps and the partials
        k_step, tiles = FUSED_CHUNK, None
    else:
        budget = tile_elements or DEFAULT_TILE_ELEMENTS.get(device.type, DEFAULT_TILE_ELEMENTS["cuda"])
        k_step, r_step = tile_shape(k_total, l_c, l_q, budget)
        tiles = _TileMatcher(prepared_query, precision, l_c, r_step, bits, device)
    best_c_of_q = torch.empty(k_total, l_q, dtype=torch.int64, device=device)
    best_q_of_c = torch.empty(k_total, l_c, dtype=torch.int64, device=device)
    for k0 in range(0, k_total, k_step):
        loaded = cands.load(slice(k0, k0 + k_step)).reshape(-1, l_c, channels)
        chunk = _prepare(loaded.to(device, non_blocking=True), precision, bits)
        best_c_of_q[k0 : k0 + chunk.shape[0]], best_q_of_c[k0 : k0 + chunk.shape[0]] = (fused or tiles)(chunk)
    return BestMatches(best_c_of_q, best_q_of_c)


Matcher = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _fused_matcher(query: torch.Tensor, precision: Precision, device: torch.device) -> Matcher | None:
    """A kernel that reduces similarities where they are computed, if this device and precision have one."""
    if native_enabled(device, precision, query.shape[-1]):
        return native_matcher(query, precision)
    if fused_enabled(device, precision):
        return functools.partial(fused_best_matches, query)
    return None


class _TileMatcher:
    """A chunk of candidates, r_step positions at a time: GEMM tiles in memory, then the reducers."""

    def __init__(
        self,
        query: torch.Tensor,
        precision: Precision,
        l_c: int,
        r_step: int,
        bits: int,
        device: torch.device,
    ) -> None:
        self.kernel = similarity_kernel(query, precision)
        self.reducer = _reducer(precision, self.kernel, query.shape[0], r_step, bits, device)
        self.l_c, self.r_step = l_c, r_step

    def __call__(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.reducer.start(chunk.shape[0], self.l_c)
        for i0 in range(0, self.l_c, self.r_step):
            self.reducer.update(self.kernel(chunk[:, i0 : i0 + self.r_step]), i0)
        return self.reducer.finish()


def _reducer(
    precision: Precision, kernel: SimilarityKernel, l_q: int, r_step: int, bits: int, device: torch.device
) -> PackedIntReducer | BucketFloatReducer | FloatReducer:
    """Packed int keys for int8; packed bucket keys for float on CPU; torch's argmax on GPUs, fast there."""
    if precision is Precision.INT8:
        return PackedIntReducer(l_q, r_step, bits, device, kernel.int_offset)
    if device.type == "cpu":
        return BucketFloatReducer(l_q, r_step, bits, device)
    return FloatReducer(l_q, device)


def tile_shape(k: int, l_c: int, l_q: int, tile_elements: int) -> tuple[int, int]:
    """(candidates per chunk, candidate positions per tile) with k_step * r_step * l_q <= budget."""
    rows = max(1, tile_elements // max(l_q, 1))
    if rows >= l_c:
        return max(1, min(k, rows // l_c)), l_c
    return 1, rows


def _prepare(maps: torch.Tensor, precision: Precision, bits: int) -> torch.Tensor:
    if precision is Precision.INT8:
        if maps.dtype == torch.int8:  # quantized already by quantize_int8 (a compact query, query_maps.py)
            return maps.contiguous()
        return quantize_int8(maps, bits)
    return maps.to(FLOAT_DTYPES[precision]).contiguous()
