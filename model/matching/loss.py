"""The local part of SelaVPR's training loss (spec section 6), on the same MNN core as re-ranking.

sim(a, b) is the mean, over the mutual-nearest-neighbour pairs (i, j), of <a[i], b[j]>. The pairs are
found without gradient (exact float32); the gradient flows through those dot products only.
"""

from __future__ import annotations

import torch

from model.matching.mnn import mnn_pairs


def mnn_similarity(
    a_local: torch.Tensor, b_local: torch.Tensor, reference_compatible: bool = False
) -> torch.Tensor:
    """(B, h, w, C) x (B, h', w', C) -> (B,) differentiable mean similarity over each pair's MNN matches.

    There is always at least one pair (the first maximal entry of the similarity matrix is mutual). With
    exactly one, the authors' code (the squeeze() quirk of scoring) uses the mean of position-aligned
    similarities instead: `reference_compatible=True` does the same.
    """
    sims = []
    for a, b in zip(a_local, b_local, strict=True):
        with torch.no_grad():
            a_idx, b_idx = mnn_pairs(a.detach(), b.detach(), "float32")
        a_flat, b_flat = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        if reference_compatible and len(a_idx) == 1:
            sims.append((a_flat * b_flat).sum(dim=-1).mean())
        else:
            a_idx, b_idx = a_idx.to(a.device), b_idx.to(a.device)
            sims.append((a_flat[a_idx] * b_flat[b_idx]).sum(dim=-1).mean())
    return torch.stack(sims)


def local_triplet_loss(
    query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, reference_compatible: bool = False
) -> torch.Tensor:
    """max(sim(q, n) - sim(q, p), 0), summed over the batch (B) and the negatives (N), divided by B * N.

    query, positive (B, h, w, C); negatives (B, N, h, w, C).
    """
    b, n = negatives.shape[:2]
    sim_pos = mnn_similarity(query, positive, reference_compatible)  # (B,)
    sim_neg = mnn_similarity(
        query.repeat_interleave(n, dim=0), negatives.flatten(0, 1), reference_compatible
    ).view(b, n)
    return torch.clamp(sim_neg - sim_pos[:, None], min=0).sum() / (b * n)
