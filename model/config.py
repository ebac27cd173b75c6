"""Architecture descriptions as data: a ViT size, the SelaVPR additions, and the local feature modes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any, Literal

PATCH_SIZE = 14
# DINOv2 stores its positional embedding for a 37 x 37 patch grid (518 px).
PRETRAIN_GRID = 37
DEFAULT_IMAGE_SIZE = 224


class LocalMode(StrEnum):
    """Which dense features re-ranking matches on. Recorded with every feature set so they never mix."""

    # SelaVPR's trained up-convolution head: (4g-3) x (4g-3) x 128, 61 x 61 x 128 at 224 px.
    LOCAL_HEAD = "local_head"
    # Training-free: the L2-normalised patch tokens of the feature block (below), g x g x D (16 x 16 x D at
    # 224 px); with feature block "final", the final-norm tokens.
    PATCH_TOKENS = "patch_tokens"


# Where the descriptors come from: "final" is the paper's path (every block, then the final LayerNorm);
# a block index N (0-based) takes block N's raw output, without the final norm, and the forward stops
# there. Recorded with every feature set, like the local mode.
FINAL = "final"
FeatureBlock = int | Literal["final"]


def training_free_block(depth: int) -> int:
    """The starting point for a plain DINOv2 backbone: the block at about two thirds of its depth (index 8
    of 12 for ViT-S/B, 16 of 24 for ViT-L, 27 of 40 for ViT-g). Measured on ViT-S only (docs/model.md)."""
    return round(2 * depth / 3)


def parse_feature_block(value: str | int) -> FeatureBlock:
    """'final' or a block index, as typed on a command line or in an environment variable."""
    text = str(value).strip().lower()
    if text == FINAL:
        return FINAL
    try:
        block = int(text)
    except ValueError:
        raise ValueError(f"feature block {value!r}: expected a block index (0-based) or {FINAL!r}") from None
    if block < 0:
        raise ValueError(f"feature block {block} is negative: expected a block index (0-based) or {FINAL!r}")
    return block


def check_feature_block(block: FeatureBlock, depth: int) -> FeatureBlock:
    """A parsed block, checked against a backbone of this depth."""
    block = parse_feature_block(block)
    if block != FINAL and block >= depth:
        raise ValueError(f"feature block {block} does not exist: this backbone has blocks 0-{depth - 1}")
    return block


@dataclass(frozen=True)
class ViTConfig:
    """A DINOv2 ViT. Heads always have 64 channels, as in every released DINOv2 size."""

    embed_dim: int
    depth: int
    num_heads: int
    num_registers: int = 0
    patch_size: int = PATCH_SIZE
    pos_grid: int = PRETRAIN_GRID
    mlp_hidden: int | None = None  # None: 4 x embed_dim
    ffn: str = "mlp"  # "mlp" (GELU MLP) or "swiglu" (ViT-g/14)

    @property
    def hidden_features(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else 4 * self.embed_dim

    @property
    def size_name(self) -> str:
        for name, preset in VIT_SIZES.items():
            if (preset.embed_dim, preset.depth) == (self.embed_dim, self.depth):
                return name + (f"_reg{self.num_registers}" if self.num_registers else "")
        return f"vit_d{self.embed_dim}_l{self.depth}"


VIT_SIZES: dict[str, ViTConfig] = {
    "vits14": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vitb14": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vitl14": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
    # SwiGLU hidden size: int(4 * 1536 * 2 / 3) rounded up to a multiple of 8.
    "vitg14": ViTConfig(embed_dim=1536, depth=40, num_heads=24, mlp_hidden=4096, ffn="swiglu"),
}


@dataclass(frozen=True)
class SelaVPRConfig:
    """The whole network: backbone, adapters, local head, GeM."""

    vit: ViTConfig
    # Without adapters the backbone is plain DINOv2; zero-initialised adapters compute the same thing,
    # so checkpoints that carry none skip them and save ~15% of the compute.
    adapters: bool = True
    local_head_channels: tuple[int, int] = (256, 128)
    gem_p: float = 3.0
    gem_eps: float = 1e-6

    @property
    def adapter_hidden(self) -> int:
        return self.vit.embed_dim // 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SelaVPRConfig:
        data = dict(data)
        vit = ViTConfig(**data.pop("vit"))
        data["local_head_channels"] = tuple(data.get("local_head_channels", (256, 128)))
        return cls(vit=vit, **data)

    def with_adapters(self, adapters: bool) -> SelaVPRConfig:
        return replace(self, adapters=adapters)


def vit_config(size: str, num_registers: int = 0) -> ViTConfig:
    try:
        return replace(VIT_SIZES[size], num_registers=num_registers)
    except KeyError:
        raise ValueError(f"unknown ViT size {size!r}; expected one of {sorted(VIT_SIZES)}") from None


def patch_grid(image_side: int, patch_size: int = PATCH_SIZE) -> int:
    """Patch grid side for an input side; the input must be a positive multiple of the patch size."""
    if image_side <= 0 or image_side % patch_size:
        raise ValueError(f"image side {image_side} is not a positive multiple of the patch size {patch_size}")
    return image_side // patch_size


def local_side(grid: int) -> int:
    """Side of the local-head map: two stride-2 transposed convolutions (k=3, p=1) give 4g - 3."""
    return 4 * grid - 3
