"""Building blocks of the DINOv2 ViT with SelaVPR's adapters, one concept per module."""

from model.layers.adapter import Adapter
from model.layers.attention import Attention
from model.layers.block import Block
from model.layers.layer_scale import LayerScale
from model.layers.mlp import Mlp, SwiGLUFFN
from model.layers.patch_embed import PatchEmbed

__all__ = ["Adapter", "Attention", "Block", "LayerScale", "Mlp", "PatchEmbed", "SwiGLUFFN"]
