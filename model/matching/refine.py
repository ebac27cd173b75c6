"""The int8+float32 policy: int8 counts for every candidate, then float32 recounts for those that could
still reach the top, within a budget that keeps the whole at most the cost of float32 alone.

Guarantee (given the int8 error allowance, precision.int8_count_error, an empirical bound): when
`RefinedCounts.top_exact` is true, the top `exact_top` places of the re-ranked list, and their counts,
are what float32 gives. It is true whenever the candidates that could still reach the top fit in the
recount budget, which is the case when a candidate stands out (a place in the database). When many
candidates are about equally good (typically a place missing from the database) the budget runs out,
the remaining candidates keep int8 counts and `top_exact` is false.

Cost: one int8 pass over all K candidates plus at most `max_recount_fraction * K` float32 recounts.
With int8 at most half of float32's time (default_precision picks this policy only there) and the
default fraction 0.25, that stays under float32's own time on any counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.matching.precision import int8_count_error

# float32 recounts at most this fraction of the K candidates (see the module docstring).
MAX_RECOUNT_FRACTION = 0.25
# Recounted a few at a time, so that the floor rises between batches and drops hopeless contenders.
RECOUNT_BATCH = 4


@dataclass(frozen=True)
class RecountPolicy:
    exact_top: int = 1
    max_recount_fraction: float = MAX_RECOUNT_FRACTION

    def budget(self, k: int) -> int:
        """Float32 recounts allowed among k candidates; 0 (k < 4 by default): float32 from the start."""
        return math.floor(self.max_recount_fraction * k)


@dataclass
class RefinedCounts:
    counts: torch.Tensor  # (K,) int64: float32 counts where recounted, int8 counts elsewhere
    recounted: torch.Tensor  # indices of the candidates recounted in float32
    top_exact: bool  # the top `exact_top` places are float32's (see the module docstring)


def refine_candidates(int8_counts: torch.Tensor, exact_top: int = 1) -> torch.Tensor:
    """Indices of the candidates whose float32 count could reach the top `exact_top` places, given
    int8 counts and their error allowance: those whose upper bound reaches the lower bound of the
    `exact_top`-th best. Everything outside stays below every candidate recounted exactly."""
    if int8_counts.numel() == 0 or exact_top <= 0:
        return torch.zeros(0, dtype=torch.int64)
    floor = _kth(int8_counts, exact_top).double() - int8_count_error(_kth(int8_counts, exact_top))
    return torch.nonzero(_ceiling(int8_counts) >= floor).flatten()


def refine(
    int8_counts: torch.Tensor,
    recount: Callable[[list[int]], torch.Tensor],
    policy: RecountPolicy = RecountPolicy(),
) -> RefinedCounts:
    """Recount contenders in float32 (`recount(indices) -> exact counts`), best int8 count first, a
    batch at a time. After each batch the floor becomes the exact_top-th best exact count known, which
    every possible top candidate must reach; contenders whose upper bound falls below it are dropped."""
    counts = int8_counts.clone()
    contenders = refine_candidates(int8_counts, policy.exact_top)
    contenders = contenders[torch.argsort(int8_counts[contenders], descending=True, stable=True)]
    ceiling = _ceiling(int8_counts)
    budget, done = policy.budget(len(int8_counts)), []
    while len(contenders) and len(done) < budget:
        take = min(RECOUNT_BATCH, budget - len(done))
        batch, contenders = contenders[:take], contenders[take:]
        counts[batch] = recount(batch.tolist())
        done += batch.tolist()
        if len(done) >= policy.exact_top:
            floor = _kth(counts[done], policy.exact_top)
            contenders = contenders[ceiling[contenders] >= floor]
    recounted = torch.tensor(done, dtype=torch.int64)
    return RefinedCounts(counts, recounted, top_exact=len(contenders) == 0)


def _kth(counts: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(counts, min(k, counts.numel())).values[-1]


def _ceiling(int8_counts: torch.Tensor) -> torch.Tensor:
    return int8_counts.double() + int8_count_error(int8_counts)
