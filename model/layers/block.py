"""A DINOv2 transformer block with SelaVPR's serial and parallel adapters (spec section 2)."""

import torch
from torch import nn

from model.layers.adapter import Adapter
from model.layers.attention import Attention
from model.layers.layer_scale import LayerScale
from model.layers.mlp import Mlp, SwiGLUFFN

PARALLEL_ADAPTER_SCALE = 0.2
LAYER_NORM_EPS = 1e-6


class Block(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, hidden: int, ffn: str = "mlp", adapter_hidden: int | None = None
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = SwiGLUFFN(dim, hidden) if ffn == "swiglu" else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim)
        # None: plain DINOv2 block (what zero-initialised adapters compute, without their cost).
        self.adapter1 = Adapter(dim, adapter_hidden) if adapter_hidden else None
        self.adapter2 = Adapter(dim, adapter_hidden) if adapter_hidden else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.norm1(x))
        if self.adapter1 is not None:
            a = a + self.adapter1(a)  # serial adapter with its own skip, inside LayerScale
        x = x + self.ls1(a)
        h = self.norm2(x)
        f = self.mlp(h)
        if self.adapter2 is not None:
            f = f + PARALLEL_ADAPTER_SCALE * self.adapter2(h)  # parallel adapter, no skip
        return x + self.ls2(f)
