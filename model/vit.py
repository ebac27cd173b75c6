"""The DINOv2 vision transformer (S/B/L/g, 0 or 4 registers), returning final-norm patch tokens or the raw
patch tokens of an earlier block."""

import torch
from torch import nn

from model.config import FINAL, FeatureBlock, ViTConfig
from model.layers import Block, PatchEmbed
from model.layers.block import LAYER_NORM_EPS
from model.pos_embed import interpolate_pos_embed


class DinoVisionTransformer(nn.Module):
    """Parameter names follow the official DINOv2 files, so their state dicts load as they are."""

    def __init__(self, cfg: ViTConfig, adapter_hidden: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(d, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, d))
        if cfg.num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # unused at inference; kept for the key set
        self.blocks = nn.ModuleList(
            Block(d, cfg.num_heads, cfg.hidden_features, cfg.ffn, adapter_hidden) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._pos_cache_owner: tuple = ()

    def pos_embed_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Interpolated table for a grid; depends only on the input size, so it is cached per size."""
        if self.pos_embed.requires_grad and torch.is_grad_enabled():
            return interpolate_pos_embed(self.pos_embed, grid_h, grid_w)
        p = self.pos_embed
        owner = (p.device, p.dtype, p.data_ptr(), p._version)  # changes on .to() and on loading weights
        if owner != self._pos_cache_owner:
            self._pos_cache, self._pos_cache_owner = {}, owner
        table = self._pos_cache.get((grid_h, grid_w))
        if table is None:
            with torch.no_grad():
                table = interpolate_pos_embed(p, grid_h, grid_w)
            self._pos_cache[(grid_h, grid_w)] = table
        return table

    def prepare_tokens(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        p = self.cfg.patch_size
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = x + self.pos_embed_for(h // p, w // p).to(x.dtype)
        if self.cfg.num_registers:  # registers go in after the positional embedding and carry none
            x = torch.cat((x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]), dim=1)
        return x

    def forward(self, images: torch.Tensor, feature_block: FeatureBlock = FINAL) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, H/14 * W/14, D) patch tokens, row-major: after every block
        and the final norm ("final"), or block `feature_block`'s raw output, the later blocks never run."""
        x = self.prepare_tokens(images)
        last = len(self.blocks) - 1 if feature_block == FINAL else int(feature_block)
        if not 0 <= last < len(self.blocks):
            raise ValueError(f"feature block {feature_block} does not exist: blocks 0-{len(self.blocks) - 1}")
        for block in self.blocks[: last + 1]:
            x = block(x)
        if feature_block == FINAL:
            x = self.norm(x)
        return x[:, 1 + self.cfg.num_registers :]
