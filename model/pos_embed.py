"""Positional-embedding interpolation, the DINOv2 way (spec section 1).

DINOv2 resizes its 37 x 37 table with a *scale factor* of (g + 0.1) / 37 rather than a target size: the
output has floor(37 * scale) = g rows, but the bicubic sampling grid follows the given scale, so the
result differs from `size=(g, g)`. Checkpoints were trained with this rule; reproducing them needs it.
"""

import math

import torch
import torch.nn.functional as F

# Added to the grid size so that floor(37 * (g + offset) / 37) cannot fall to g - 1 through rounding.
SCALE_OFFSET = 0.1


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(1, 1 + N, D) stored table -> (1, 1 + grid_h * grid_w, D); the class entry is kept as is."""
    num_patches = pos_embed.shape[1] - 1
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"stored positional embedding has {num_patches} patch entries, not a square grid")
    if grid_h == grid_w == side:
        return pos_embed
    dim = pos_embed.shape[-1]
    table = pos_embed.float()
    patch = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(
        patch,
        scale_factor=((grid_h + SCALE_OFFSET) / side, (grid_w + SCALE_OFFSET) / side),
        mode="bicubic",
        align_corners=False,
        antialias=False,
    )
    if patch.shape[-2:] != (grid_h, grid_w):  # cannot happen for the offset above; guards edits to it
        raise AssertionError(f"interpolated grid {tuple(patch.shape[-2:])} != ({grid_h}, {grid_w})")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat((table[:, :1], patch), dim=1).to(pos_embed.dtype)
