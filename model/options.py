"""The model options: which weights, where, and how an image becomes descriptors. One definition, built
once from the settings (`app.settings.Settings.model_options`) or the CLI flags
(`app.commands.common.model_options`) and passed as it is to the service, the index builder, the
evaluation and the Ray encoder; `FeatureExtractor.from_options` loads it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from model.config import FeatureBlock


@dataclass(frozen=True)
class ModelOptions:
    checkpoint: str = "default"  # 'default', a named checkpoint, a file or a selavpr checkpoint directory
    device: str | None = None  # cpu, cuda, cuda:N; None or 'auto': CUDA when present
    image_size: int | None = None  # square input side; None: the checkpoint's (224)
    local_mode: str | None = None  # local_head or patch_tokens; None: the head when trained
    feature_block: FeatureBlock | None = None  # None: the checkpoint's default block
    model_dtype: str = "float32"  # the forward's dtype (autocast)
    exif_transpose: bool = True  # False: ignore EXIF orientation, as the authors' code does

    def on(self, device: str | None) -> ModelOptions:
        """The same model on another device (a Ray actor's, a shard replica's)."""
        return replace(self, device=device)
