"""The default matching precision on real maps: the re-ranked top-1 must be float32's."""

from __future__ import annotations

import torch

from model.matching import mnn_scores, rerank_order


def test_default_precision_keeps_the_float32_top1_on_real_maps(shared_embeddings):
    maps = torch.from_numpy(shared_embeddings[1].local)
    changed = []
    for i in range(len(maps)):
        others = torch.cat([maps[:i], maps[i + 1 :]])
        exact = mnn_scores(maps[i], others, "float32")
        default = mnn_scores(maps[i], others)
        if rerank_order(default)[0] != rerank_order(exact)[0]:
            changed.append(i)
        assert default[exact.argmax()] == exact.max()  # the winner's count is exact
    assert changed == []
