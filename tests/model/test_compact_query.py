"""A query map sent to a shard in the precision it counts in (model/matching/compact.py): a quarter of
float32's bytes in int8, half in 16 bits, and the very counts of the float32 map."""

from __future__ import annotations

import pickle

import pytest
import torch

from model.matching import mnn_scores
from model.matching.compact import CompactQuery, check_precision, compact_query
from model.matching.precision import Precision

SHAPE = (16, 16, 64)


def _maps(k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randn((k, *SHAPE), generator=generator)
    return maps / maps.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize(
    ("precision", "share"),
    [(Precision.INT8, 0.25), (Precision.FLOAT16, 0.5), (Precision.BFLOAT16, 0.5), (Precision.FLOAT32, 1.0)],
)
def test_a_compact_query_counts_exactly_as_the_float32_map(precision, share):
    query, candidates = _maps(1, 0)[0], _maps(12, 1)
    # near duplicates, so that counts are large and near-ties plentiful
    candidates[:4] = query + 0.3 * candidates[:4]
    compact = compact_query(query, precision, SHAPE[0] * SHAPE[1])
    assert compact.nbytes == pytest.approx(share * query.numel() * 4, abs=4)
    received = pickle.loads(pickle.dumps(compact))  # as Ray ships it
    expected = mnn_scores(query, candidates, precision)
    assert torch.equal(mnn_scores(received.tensor(), candidates, precision), expected)
    if precision is Precision.INT8:
        assert compact.scale is not None
        assert torch.allclose(received.tensor().float() / compact.scale, query, atol=1 / compact.scale)


def test_a_compacted_query_is_refused_in_another_precision():
    compact = compact_query(_maps(1, 0)[0], Precision.INT8, SHAPE[0] * SHAPE[1])
    with pytest.raises(ValueError, match="compacted for int8 cannot be counted in float32"):
        check_precision(compact, Precision.FLOAT32)
    float32 = compact_query(_maps(1, 0)[0], Precision.FLOAT32, SHAPE[0] * SHAPE[1])
    check_precision(float32, Precision.INT8)  # the engine quantizes a float32 map itself
    assert isinstance(float32, CompactQuery) and float32.scale is None
