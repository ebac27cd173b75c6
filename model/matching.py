"""Mutual-nearest-neighbour (MNN) counts between dense local maps (spec section 5).

For a query map Q (L_q positions) and a candidate map C (L_c positions), S = C Q^T holds cosine similarities.
Query position j's best candidate position is i = argmax_i S[i, j]; candidate position i's best query
position is argmax_j S[i, j]; j is a mutual nearest neighbour when the best query position of its best
candidate position is j itself. The score is the number of such j. Ties go to the lowest index, as
torch.argmax does.

The similarities are computed a tile at a time (a few candidates x a block of candidate positions x all
query positions), so the (K, L_c, L_q) tensor that the authors materialise (5.5 GB at K = 100) never
exists: row argmaxes are final per tile, column maxima are carried across tiles.

The authors' code scores a candidate with exactly one MNN pair as 0 (a squeeze() quirk).
`reference_compatible=True` reproduces that; by default one pair counts as 1.
"""

from __future__ import annotations

import numpy as np
import torch

PRECISIONS = {"float32": torch.float32}
# Similarity elements per tile; 4 Mi float32 = 16 MiB, small enough to stay cache-friendly.
TILE_ELEMENTS = 4 * 1024 * 1024


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def mnn_scores(
    query_local: torch.Tensor | np.ndarray,
    cand_local: torch.Tensor | np.ndarray,
    precision: str | None = None,
    *,
    reference_compatible: bool = False,
    tile_elements: int = TILE_ELEMENTS,
) -> torch.Tensor:
    """MNN counts of one query map (h, w, C) against K candidate maps (K, h', w', C) -> (K,) int64.

    `precision="float32"` (also the default here) gives exact counts. Computation runs on the query's
    device; the result is on the CPU.
    """
    query = _as_tensor(query_local)
    cands = _as_tensor(cand_local)
    if query.ndim != 3 or cands.ndim != 4 or query.shape[-1] != cands.shape[-1]:
        raise ValueError(
            f"expected query (h, w, C) and candidates (K, h, w, C), got {tuple(query.shape)} and "
            f"{tuple(cands.shape)}"
        )
    dtype = _compute_dtype(precision)
    q = query.reshape(-1, query.shape[-1]).to(dtype)  # (L_q, C)
    c = cands.flatten(1, 2)  # (K, L_c, C)
    counts = torch.empty(c.shape[0], dtype=torch.int64)
    if c.shape[0] == 0:
        return counts
    k_step, i_step = _tile_shape(c.shape[0], c.shape[1], q.shape[0], tile_elements)
    for k0 in range(0, c.shape[0], k_step):
        chunk = c[k0 : k0 + k_step].to(device=q.device, dtype=dtype)
        mutual, _ = _mnn_chunk(q, chunk, i_step)
        counts[k0 : k0 + chunk.shape[0]] = mutual.sum(dim=1).cpu()
    if reference_compatible:
        counts[counts == 1] = 0
    return counts


def mnn_pairs(
    query_local: torch.Tensor | np.ndarray,
    cand_local: torch.Tensor | np.ndarray,
    precision: str | None = None,
    *,
    tile_elements: int = TILE_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNN pairs between one query map and one candidate map, as flat position indices
    (row * w + col): (query_idx (n,), cand_idx (n,)), ordered by query position."""
    query = _as_tensor(query_local)
    cand = _as_tensor(cand_local)
    dtype = _compute_dtype(precision)
    q = query.reshape(-1, query.shape[-1]).to(dtype)
    c = cand.reshape(1, -1, cand.shape[-1]).to(device=q.device, dtype=dtype)
    _, i_step = _tile_shape(1, c.shape[1], q.shape[0], tile_elements)
    mutual, best_c_of_q = _mnn_chunk(q, c, i_step)
    query_idx = torch.nonzero(mutual[0]).flatten()
    return query_idx.cpu(), best_c_of_q[0, query_idx].cpu()


def _compute_dtype(precision: str | None) -> torch.dtype:
    name = precision or "float32"
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(PRECISIONS)}")
    return PRECISIONS[name]


def _tile_shape(k: int, l_c: int, l_q: int, tile_elements: int) -> tuple[int, int]:
    """(candidates per chunk, candidate positions per tile) with k_step * i_step * l_q <= budget."""
    rows = max(1, tile_elements // max(l_q, 1))  # candidate positions per tile, summed over candidates
    if rows >= l_c:
        return max(1, min(k, rows // l_c)), l_c
    return 1, rows


def _mnn_chunk(q: torch.Tensor, c: torch.Tensor, i_step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q (L_q, C), c (k, L_c, C) -> (mutual (k, L_q) bool, best candidate position of each query position
    (k, L_q)), the similarities built i_step candidate rows at a time."""
    k, l_c, _ = c.shape
    l_q = q.shape[0]
    best_q_of_c = torch.empty(k, l_c, dtype=torch.int64, device=q.device)  # argmax_j S[i, j]
    col_max = torch.full((k, l_q), -torch.inf, dtype=q.dtype, device=q.device)  # max_i S[i, j]
    best_c_of_q = torch.zeros(k, l_q, dtype=torch.int64, device=q.device)  # argmax_i S[i, j]
    q_t = q.T
    for i0 in range(0, l_c, i_step):
        sim = torch.matmul(c[:, i0 : i0 + i_step], q_t)  # (k, rows, L_q)
        best_q_of_c[:, i0 : i0 + sim.shape[1]] = sim.argmax(dim=2)
        tile_max, tile_arg = sim.max(dim=1)
        better = tile_max > col_max  # strict: an earlier tile keeps a tie, so the lowest index wins
        col_max = torch.where(better, tile_max, col_max)
        best_c_of_q = torch.where(better, tile_arg + i0, best_c_of_q)
    back = torch.gather(best_q_of_c, 1, best_c_of_q)  # best query position of each j's best candidate
    return back == torch.arange(l_q, device=q.device), best_c_of_q
