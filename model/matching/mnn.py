"""Mutual-nearest-neighbour (MNN) counts between dense local maps (spec section 5), and re-ranking.

For a query map Q (L_q positions) and a candidate map C (L_c positions), S = C Q^T holds cosine
similarities. Query position j's best candidate position is i = argmax_i S[i, j]; candidate position i's
best query position is argmax_j S[i, j]; j is a mutual nearest neighbour when the best query position of
its best candidate position is j itself. The score is the number of such j. Equal similarities go to
the lowest position index, as torch.argmax decides.

The authors' code scores a candidate with exactly one MNN pair as 0 (a squeeze() quirk);
`reference_compatible=True` reproduces that, by default one pair counts as 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.matching.engine import best_matches
from model.matching.maps import CandidateMaps, DenseMaps, SubsetMaps, as_candidate_maps
from model.matching.precision import Precision, int8_count_error, resolve_precision

MapLike = torch.Tensor | np.ndarray
CandidatesLike = torch.Tensor | np.ndarray | CandidateMaps


def _as_tensor(x: MapLike) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def _compute_device(query: torch.Tensor, device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else query.device


def mnn_scores(
    query_local: MapLike,
    cand_local: CandidatesLike,
    precision: str | Precision | None = None,
    *,
    reference_compatible: bool = False,
    exact_top: int = 1,
    device: str | torch.device | None = None,
    tile_elements: int | None = None,
) -> torch.Tensor:
    """MNN counts of one query map (h, w, C) against K candidate maps (K, h', w', C) -> (K,) int64 on CPU.
    Candidates may also be a CandidateMaps (a store that decodes a chunk at a time).

    `precision`: "float32" (exact), "bfloat16", "float16", "int8", or "int8+float32": int8 everywhere,
    float32 for every candidate that could reach the top `exact_top` places. None picks the device's
    default (model.matching.precision.DEFAULT_PRECISION). Computation runs on `device`, else where the
    query is. Never more than `tile_elements` similarities exist at once.
    """
    query, cands = _as_tensor(query_local), as_candidate_maps(cand_local)
    if query.ndim != 3 or query.shape[-1] != cands.map_shape[-1]:
        raise ValueError(
            f"expected query (h, w, C) and candidates (K, h, w, C), got {tuple(query.shape)} and "
            f"(K, {', '.join(map(str, cands.map_shape))})"
        )
    compute_on = _compute_device(query, device)
    mode = resolve_precision(precision, compute_on)
    if mode is Precision.INT8_FLOAT32:
        counts = _counts(query, cands, Precision.INT8, compute_on, tile_elements)
        contenders = refine_candidates(counts, exact_top)
        if len(contenders):
            recount = SubsetMaps(cands, contenders.tolist())
            counts[contenders] = _counts(query, recount, Precision.FLOAT32, compute_on, tile_elements)
    else:
        counts = _counts(query, cands, mode, compute_on, tile_elements)
    if reference_compatible:
        counts[counts == 1] = 0
    return counts


def _counts(
    query: torch.Tensor,
    cands: CandidateMaps,
    mode: Precision,
    device: torch.device,
    tile_elements: int | None,
) -> torch.Tensor:
    if len(cands) == 0:
        return torch.zeros(0, dtype=torch.int64)
    matches = best_matches(query.flatten(0, 1), cands, mode, device, tile_elements)
    return matches.mutual().sum(dim=1).cpu()


def refine_candidates(int8_counts: torch.Tensor, exact_top: int = 1) -> torch.Tensor:
    """Indices of the candidates whose float32 count could reach the top `exact_top` places, given
    int8 counts and their error allowance: those whose upper bound reaches the lower bound of the
    `exact_top`-th best. Everything outside stays below every candidate recounted exactly."""
    if int8_counts.numel() == 0 or exact_top <= 0:
        return torch.zeros(0, dtype=torch.int64)
    kth = torch.topk(int8_counts, min(exact_top, int8_counts.numel())).values[-1]
    floor = kth.double() - int8_count_error(kth)
    ceiling = int8_counts.double() + int8_count_error(int8_counts)
    return torch.nonzero(ceiling >= floor).flatten()


def mnn_scores_batch(
    queries: MapLike,
    candidates: MapLike | Sequence[MapLike],
    precision: str | Precision | None = None,
    **kwargs,
) -> list[torch.Tensor]:
    """Several queries at once, each against its own candidates: queries (Q, h, w, C), candidates
    (Q, K, h, w, C) or a list of Q arrays (K_q, h, w, C). Same results as one query at a time."""
    if len(queries) != len(candidates):
        raise ValueError(f"{len(queries)} queries but {len(candidates)} candidate sets")
    return [mnn_scores(q, c, precision, **kwargs) for q, c in zip(queries, candidates, strict=True)]


def mnn_pairs(
    query_local: MapLike,
    cand_local: MapLike,
    precision: str | Precision | None = None,
    *,
    device: str | torch.device | None = None,
    tile_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNN pairs between one query map (h, w, C) and one candidate map (h', w', C), as flat position
    indices (row * w + col): (query_idx (n,), cand_idx (n,)) on CPU, ordered by query position."""
    query, cand = _as_tensor(query_local), _as_tensor(cand_local)
    compute_on = _compute_device(query, device)
    mode = resolve_precision(precision, compute_on)
    if mode is Precision.INT8_FLOAT32:  # one pair: what the refined mode gives a top candidate
        mode = Precision.FLOAT32
    matches = best_matches(query.flatten(0, 1), DenseMaps(cand[None]), mode, compute_on, tile_elements)
    query_idx = torch.nonzero(matches.mutual()[0]).flatten()
    return query_idx.cpu(), matches.best_c_of_q[0, query_idx].cpu()


def rerank_order(scores: MapLike, reference_compatible: bool = False) -> np.ndarray:
    """Positions of the candidates (given in global-rank order) sorted by MNN score, descending.

    Equal scores keep their global order (a stable sort). The authors reverse numpy's default
    ascending sort instead, which puts the later global rank first among equals:
    `reference_compatible=True` does exactly that.
    """
    values = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores)
    if reference_compatible:
        return np.argsort(values)[::-1].copy()
    return np.argsort(-values.astype(np.int64), kind="stable")
