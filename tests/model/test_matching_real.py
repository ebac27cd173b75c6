"""The default matching precision and the int8+float32 policy on real maps: the re-ranked top-1 must be
float32's (measured: 32 of 32 queries, with and without the query's place among the candidates)."""

from __future__ import annotations

import pytest
import torch

from model.matching import mnn_scores, mnn_scores_detailed, rerank_order


@pytest.mark.parametrize("precision", [None, "int8+float32"])
def test_the_float32_top1_stays_on_real_maps(shared_embeddings, precision):
    maps = torch.from_numpy(shared_embeddings[1].local)
    changed = []
    for i in range(len(maps)):
        others = torch.cat([maps[:i], maps[i + 1 :]])
        exact = mnn_scores(maps[i], others, "float32")
        scored = mnn_scores_detailed(maps[i], others, precision)
        if rerank_order(scored.counts)[0] != rerank_order(exact)[0]:
            changed.append(i)
        if scored.top_exact:
            assert scored.counts[exact.argmax()] == exact.max()  # the winner's count is exact
        assert scored.recounted <= len(others) // 4  # the budget
    assert changed == []
