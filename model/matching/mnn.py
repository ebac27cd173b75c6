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

from dataclasses import dataclass

import numpy as np
import torch

from model.matching.defaults import resolve_precision
from model.matching.engine import best_matches
from model.matching.maps import CandidateMaps, DenseMaps, SubsetMaps, as_candidate_maps
from model.matching.precision import Precision
from model.matching.refine import RecountPolicy, refine

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
    float32 recounts of the candidates that could reach the top `exact_top` places, within a budget
    (model.matching.refine). None picks the device's default (defaults.default_precision). Computation
    runs on `device`, else where the query is. Never more than `tile_elements` similarities exist at once.
    """
    return mnn_scores_detailed(
        query_local,
        cand_local,
        precision,
        reference_compatible=reference_compatible,
        exact_top=exact_top,
        device=device,
        tile_elements=tile_elements,
    ).counts


@dataclass
class ScoredCandidates:
    counts: torch.Tensor  # (K,) int64 on CPU
    precision: Precision  # what was asked for, resolved
    recounted: int  # candidates recounted in float32 after int8 (int8+float32 only)
    top_exact: bool  # the top exact_top places are float32's (always for float32; see refine.py)


def mnn_scores_detailed(
    query_local: MapLike,
    cand_local: CandidatesLike,
    precision: str | Precision | None = None,
    *,
    reference_compatible: bool = False,
    exact_top: int = 1,
    device: str | torch.device | None = None,
    tile_elements: int | None = None,
) -> ScoredCandidates:
    """mnn_scores with what the precision policy did."""
    query, cands = _as_tensor(query_local), as_candidate_maps(cand_local)
    if query.ndim != 3 or query.shape[-1] != cands.map_shape[-1]:
        raise ValueError(
            f"expected query (h, w, C) and candidates (K, h, w, C), got {tuple(query.shape)} and "
            f"(K, {', '.join(map(str, cands.map_shape))})"
        )
    compute_on = _compute_device(query, device)
    mode = resolve_precision(precision, compute_on, cands.map_shape)
    policy = RecountPolicy(exact_top=exact_top)

    def counts_in(engine_mode: Precision, subset: CandidateMaps = cands) -> torch.Tensor:
        return _counts(query, subset, engine_mode, compute_on, tile_elements)

    if mode is Precision.INT8_FLOAT32 and policy.budget(len(cands)) > 0:
        refined = refine(
            counts_in(Precision.INT8),
            lambda picked: counts_in(Precision.FLOAT32, SubsetMaps(cands, picked)),
            policy,
        )
        scored = ScoredCandidates(refined.counts, mode, len(refined.recounted), refined.top_exact)
    else:
        engine_mode = Precision.FLOAT32 if mode is Precision.INT8_FLOAT32 else mode  # K < 4: float32
        scored = ScoredCandidates(counts_in(engine_mode), mode, 0, engine_mode is Precision.FLOAT32)
    if reference_compatible:
        scored.counts[scored.counts == 1] = 0
    return scored


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
