"""The MNN local loss of spec section 6: value, where its gradient goes, the one-pair quirk."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.matching import local_triplet_loss, mnn_pairs, mnn_similarity


def maps(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_similarity_is_the_mean_over_mnn_pairs_and_grads_flow_through_them_only():
    a = maps(2, 6, 6, 16, seed=0).requires_grad_()
    b = maps(2, 6, 6, 16, seed=1).requires_grad_()
    sims = mnn_similarity(a, b)
    sims.sum().backward()
    for n in range(2):
        a_idx, b_idx = mnn_pairs(a[n].detach(), b[n].detach(), "float32")
        dots = (a[n].reshape(36, 16)[a_idx] * b[n].reshape(36, 16)[b_idx]).sum(-1)
        torch.testing.assert_close(sims[n], dots.mean())
        a_rows = a.grad[n].reshape(36, 16).abs().sum(-1) > 0
        b_rows = b.grad[n].reshape(36, 16).abs().sum(-1) > 0
        assert torch.equal(torch.nonzero(a_rows).flatten(), a_idx)
        assert torch.equal(torch.nonzero(b_rows).flatten(), torch.unique(b_idx))


def test_one_pair_quirk_falls_back_to_aligned_positions():
    a = torch.zeros(1, 2, 2, 4)  # all-equal similarities: exactly one MNN pair (position 0 with 0)
    b = torch.zeros(1, 2, 2, 4)
    a[..., 0], b[..., 0] = 1.0, 1.0
    b[0, 1, 1] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert len(mnn_pairs(a[0], b[0], "float32")[0]) == 1
    assert mnn_similarity(a, b).item() == 1.0  # the one pair's dot product
    assert mnn_similarity(a, b, reference_compatible=True).item() == 0.75  # aligned: (1 + 1 + 1 + 0) / 4


def test_local_triplet_loss():
    q = maps(2, 5, 5, 8, seed=2)
    pos = F.normalize(q + 0.1 * maps(2, 5, 5, 8, seed=3), dim=-1)
    neg = maps(2, 2, 5, 5, 8, seed=4)
    assert local_triplet_loss(q, pos, neg).item() == 0.0  # positives are far more similar
    swapped = local_triplet_loss(q, neg[:, 0], pos[:, None].expand(-1, 2, -1, -1, -1))
    sim_p = mnn_similarity(q, neg[:, 0])
    sim_n = mnn_similarity(q, pos)
    expected = torch.clamp(sim_n - sim_p, min=0).sum() * 2 / 4
    torch.testing.assert_close(swapped, expected)
    assert swapped > 0
