"""Image to patch tokens: a stride-14 convolution, tokens flattened row-major."""

import torch
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch_size: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, g_h * g_w, D)
