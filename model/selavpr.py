"""The SelaVPR network: adapted DINOv2 backbone, GeM global descriptor, dense local features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import FINAL, FeatureBlock, LocalMode, SelaVPRConfig
from model.heads import LocalHead, gem_aggregation
from model.vit import DinoVisionTransformer


@dataclass
class Features:
    """One batch of descriptors. `local` is unit-norm per position, laid out (B, h, w, C)."""

    global_desc: torch.Tensor  # (B, D), unit norm
    local: torch.Tensor
    local_mode: LocalMode
    feature_block: FeatureBlock = FINAL


class SelaVPR(nn.Module):
    """Attribute names (`backbone`, `aggregation`, `LocalAdapt`) match the released checkpoints' keys."""

    def __init__(self, cfg: SelaVPRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = DinoVisionTransformer(cfg.vit, cfg.adapter_hidden if cfg.adapters else None)
        self.aggregation = gem_aggregation(cfg.gem_p, cfg.gem_eps)
        self.LocalAdapt = LocalHead(cfg.vit.embed_dim, cfg.local_head_channels)
        self.freeze_backbone()

    def freeze_backbone(self) -> None:
        """Only adapters, the local head and GeM's p train; the DINOv2 weights stay frozen."""
        for name, param in self.named_parameters():
            param.requires_grad = not name.startswith("backbone.") or ".adapter" in name

    def patch_map(self, images: torch.Tensor, feature_block: FeatureBlock = FINAL) -> torch.Tensor:
        """(B, 3, H, W) -> patch tokens as a map (B, D, H/14, W/14): final-norm ones, or block N's output."""
        p = self.cfg.vit.patch_size
        b, _, h, w = images.shape
        tokens = self.backbone(images, feature_block)
        return tokens.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2)

    def global_descriptor(self, patch_map: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.aggregation(patch_map), p=2, dim=-1)

    def local_features(self, patch_map: torch.Tensor, mode: LocalMode) -> torch.Tensor:
        if mode is LocalMode.LOCAL_HEAD:
            patch_map = self.LocalAdapt(patch_map)
        return F.normalize(patch_map.permute(0, 2, 3, 1), p=2, dim=-1)

    def forward(
        self,
        images: torch.Tensor,
        local_mode: LocalMode = LocalMode.LOCAL_HEAD,
        feature_block: FeatureBlock = FINAL,
    ) -> Features:
        """The paper's network by default; `feature_block` N is the training-free variant (docs/model.md)."""
        patch_map = self.patch_map(images, feature_block)
        return Features(
            global_desc=self.global_descriptor(patch_map),
            local=self.local_features(patch_map, LocalMode(local_mode)),
            local_mode=LocalMode(local_mode),
            feature_block=feature_block,
        )

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
