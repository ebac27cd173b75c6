"""The model forward in reduced precision: autocast, float32 outputs, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.extractor import FeatureExtractor


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_forward_returns_float32_close_to_float32(tiny_ckpt, dtype):
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    exact = FeatureExtractor.from_checkpoint(tiny_ckpt, "cpu").extract_tensors(images)
    reduced_extractor = FeatureExtractor.from_checkpoint(tiny_ckpt, "cpu", model_dtype=dtype)
    reduced = reduced_extractor.extract_tensors(images)
    for ours, ref in zip(reduced, exact, strict=True):
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        assert not torch.equal(ours, ref)  # the forward did run in reduced precision
        cos = F.cosine_similarity(ours.flatten(1), ref.flatten(1), dim=1)
        assert cos.min() > 0.99


def test_unknown_model_dtype_is_a_clear_error(tiny_ckpt):
    with pytest.raises(ValueError, match="unknown model dtype 'int4'"):
        FeatureExtractor.from_checkpoint(tiny_ckpt, "cpu", model_dtype="int4")


def test_cli_takes_the_model_dtype():
    from app.cli import build_parser

    args = build_parser().parse_args(["embed", "x.jpg", "--model-dtype", "bfloat16"])
    assert args.model_dtype == "bfloat16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["embed", "x.jpg", "--model-dtype", "int4"])
