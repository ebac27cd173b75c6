"""MNN counts (spec section 5) against the literal definition, tiling, ties and the one-match quirk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.matching import mnn_pairs, mnn_scores
from tests.reference import mnn_count_reference


def unit_maps(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen), dim=-1)


def full_tensor_counts(query: torch.Tensor, cands: torch.Tensor) -> list[int]:
    """The authors' way in float32: the whole (K, L, L) similarity tensor at once."""
    q = query.reshape(-1, query.shape[-1])
    c = cands.reshape(cands.shape[0], -1, cands.shape[-1])
    sim = torch.matmul(c, q.T)
    best_c_of_q = sim.argmax(dim=1)
    best_q_of_c = sim.argmax(dim=2)
    back = torch.gather(best_q_of_c, 1, best_c_of_q)
    return (back == torch.arange(q.shape[0])).sum(dim=1).tolist()


@pytest.mark.parametrize("tile_elements", [37, 1000, 4 * 1024 * 1024])
def test_random_maps_match_the_definition(tile_elements):
    query, cands = unit_maps(9, 9, 16, seed=1), unit_maps(7, 9, 9, 16, seed=2)
    ours = mnn_scores(query, cands, "float32", tile_elements=tile_elements)
    assert ours.dtype == torch.int64 and ours.shape == (7,)
    assert ours.tolist() == [mnn_count_reference(query.numpy(), c) for c in cands.numpy()]


def test_realistic_size_equals_full_tensor_float32():
    """61 x 61 x 128 maps, several tiles per candidate: identical to the full-tensor float32 counts."""
    query, cands = unit_maps(61, 61, 128, seed=3), unit_maps(3, 61, 61, 128, seed=4)
    cands[1] = F.normalize(query + 0.3 * cands[1], dim=-1)  # a related candidate: many matches
    ours = mnn_scores(query, cands, tile_elements=500_000)
    assert ours.tolist() == full_tensor_counts(query, cands)
    assert ours[1] > 3000 > ours[0]


def test_different_map_sizes_for_query_and_candidates():
    query, cands = unit_maps(5, 5, 8, seed=5), unit_maps(4, 7, 3, 8, seed=6)
    assert mnn_scores(query, cands).tolist() == [mnn_count_reference(query.numpy(), c) for c in cands.numpy()]


def test_identical_and_permuted_maps_match_everywhere():
    query = unit_maps(6, 6, 32, seed=7)
    perm = torch.randperm(36, generator=torch.Generator().manual_seed(0))
    shuffled = query.reshape(36, 32)[perm].reshape(6, 6, 32)
    assert mnn_scores(query, torch.stack([query, shuffled])).tolist() == [36, 36]
    q_idx, c_idx = mnn_pairs(query, shuffled)
    assert torch.equal(perm[c_idx], q_idx)  # every match pairs a position with its own vector


def test_ties_go_to_the_lowest_index():
    """One-hot maps: many exact ties. The first maximum wins on both sides, as torch.argmax decides."""
    eye = torch.eye(4)
    query = eye[[0, 1, 1, 2]].reshape(2, 2, 4)  # query positions 1 and 2 are the same vector
    cand = eye[[1, 1, 0, 3]].reshape(1, 2, 2, 4)  # candidate positions 0 and 1 are the same vector
    # q0 -> c2 -> q0: mutual. q1 -> c0 -> q1: mutual. q2 -> c0 -> q1 != q2. q3 (e2): all zero -> c0 -> q1.
    assert mnn_scores(query, cand).tolist() == [2]
    assert mnn_count_reference(query.numpy(), cand[0].numpy()) == 2
    q_idx, c_idx = mnn_pairs(query, cand[0])
    assert q_idx.tolist() == [0, 1] and c_idx.tolist() == [2, 0]


def test_ties_across_tiles_keep_the_lowest_index():
    """A tie between candidate positions that fall in different tiles resolves like one argmax."""
    query = unit_maps(1, 4, 8, seed=8)
    cand = torch.cat([unit_maps(1, 4, 8, seed=9), query, query], dim=1)  # positions 4..7 == 8..11
    counts = [mnn_scores(query, cand[None], tile_elements=t).item() for t in (4, 16, 48, 10_000)]
    assert counts == [4, 4, 4, 4]
    _, c_idx = mnn_pairs(query, cand, tile_elements=4)
    assert c_idx.tolist() == [4, 5, 6, 7]


def test_exactly_one_match_quirk():
    """All-zero maps tie everywhere: only position 0 is mutual. The authors score that as 0."""
    query, cands = torch.zeros(3, 3, 4), torch.zeros(2, 3, 3, 4)
    assert mnn_scores(query, cands).tolist() == [1, 1]
    assert mnn_scores(query, cands, reference_compatible=True).tolist() == [0, 0]
    two = unit_maps(2, 2, 4, seed=10)
    assert mnn_scores(two, two[None], reference_compatible=True).tolist() == [4]  # other counts unchanged


def test_never_builds_the_whole_similarity_tensor(monkeypatch):
    query, cands = unit_maps(20, 20, 16, seed=11), unit_maps(10, 20, 20, 16, seed=12)
    largest = []
    real_matmul = torch.matmul

    def spy(a, b):
        out = real_matmul(a, b)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(torch, "matmul", spy)
    ours = mnn_scores(query, cands, tile_elements=20_000)
    monkeypatch.undo()
    assert max(largest) <= 20_000 < 10 * 400 * 400
    assert ours.tolist() == full_tensor_counts(query, cands)


def test_numpy_inputs_and_empty_candidates():
    query, cands = unit_maps(4, 4, 8, seed=13), unit_maps(3, 4, 4, 8, seed=14)
    assert mnn_scores(query.numpy(), cands.numpy()).tolist() == mnn_scores(query, cands).tolist()
    assert mnn_scores(query, cands[:0]).shape == (0,)


def test_float16_inputs_are_computed_in_float32():
    query, cands = unit_maps(6, 6, 16, seed=15), unit_maps(2, 6, 6, 16, seed=16)
    half = mnn_scores(query.half(), cands.half(), "float32")
    assert half.tolist() == full_tensor_counts(query.half().float(), cands.half().float())


def test_pairs_agree_with_counts_and_are_mutual():
    query, cands = unit_maps(8, 8, 16, seed=17), unit_maps(3, 8, 8, 16, seed=18)
    counts = mnn_scores(query, cands)
    for cand, count in zip(cands, counts, strict=True):
        q_idx, c_idx = mnn_pairs(query, cand)
        assert len(q_idx) == count
        sim = cand.reshape(64, 16) @ query.reshape(64, 16).T
        assert torch.equal(sim.argmax(dim=0)[q_idx], c_idx)
        assert torch.equal(sim.argmax(dim=1)[c_idx], q_idx)


def test_bad_shapes_and_precision_are_rejected():
    with pytest.raises(ValueError, match="expected query"):
        mnn_scores(torch.zeros(4, 8), torch.zeros(1, 2, 2, 8))
    with pytest.raises(ValueError, match="expected query"):
        mnn_scores(torch.zeros(2, 2, 8), torch.zeros(1, 2, 2, 4))
    with pytest.raises(ValueError, match="unknown precision"):
        mnn_scores(torch.zeros(2, 2, 8), torch.zeros(1, 2, 2, 8), precision="int3")


def test_device_independent_results_on_cpu_inputs():
    query, cands = unit_maps(5, 5, 8, seed=19), unit_maps(2, 5, 5, 8, seed=20)
    assert mnn_scores(query, cands).device.type == "cpu"
    assert np.array_equal(mnn_scores(query, cands).numpy(), mnn_scores(query, cands.clone()).numpy())
