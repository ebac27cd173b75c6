"""The default int8 local store on real images: re-ranking reaches the same top-1 as float32 features."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from bench.common import untrained_head_checkpoint
from index_builder.builder import BuildConfig, build_index
from index_builder.store import IndexVersion, segment_dir
from model.extractor import FeatureExtractor
from model.matching import mnn_scores, rerank_order
from model.options import ModelOptions


@pytest.fixture(scope="module")
def head_checkpoint(tmp_path_factory):
    return untrained_head_checkpoint(tmp_path_factory.mktemp("head") / "vits14-random-head")


def test_int8_store_keeps_the_float32_top1_at_61x61(tmp_path, shared_data, head_checkpoint):
    refs = tmp_path / "refs"
    shutil.copytree(shared_data / "matching_triplets", refs / "matching_triplets")
    shutil.copytree(shared_data / "tokyo_pair", refs / "tokyo_pair")
    report = build_index(
        BuildConfig(
            references=refs,
            index_dir=tmp_path / "index",
            model=ModelOptions(checkpoint=str(head_checkpoint), device="cpu"),
        )
    )
    version = IndexVersion.open_current(tmp_path / "index")
    assert report.total == 32 and version.identity.local_shape == (61, 61, 128)
    records = version.all_records()
    per_image = (
        sum(
            (segment_dir(tmp_path / "index", s) / f).stat().st_size
            for s in version.segment_names
            for f in ("local.npy", "scale.npy")
        )
        / 32
    )
    assert per_image <= 0.5 * 2**20  # the authors' float32: 1.82 MiB
    original = FeatureExtractor.from_checkpoint(str(head_checkpoint), "cpu").embed(
        [refs / r.path for r in records]
    )
    for q in range(0, 32, 4):  # every 4th image as the query (all 32 in `python -m bench.index`)
        others = [i for i in range(32) if i != q]
        exact = mnn_scores(original.local[q], original.local[others], "float32")
        stored = mnn_scores(torch.from_numpy(original.local[q]), version.candidate_maps(others))
        assert rerank_order(stored)[0] == rerank_order(exact)[0], records[q].path
    decoded = version.read_local([0])[0]
    np.testing.assert_allclose(np.linalg.norm(decoded, axis=-1), 1.0, atol=1e-5)
    assert np.abs(decoded - original.local[0]).max() < 0.01
