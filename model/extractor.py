"""Images in, descriptors out: a loaded model, its preprocessing, a device and a batch size."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from model.config import FeatureBlock, LocalMode, local_side
from model.dtype import ModelDtype, autocast, cpu_has_native_bfloat16, resolve_model_dtype
from model.errors import ImageDecodeError
from model.options import ModelOptions
from model.preprocess import DEFAULT_MAX_PIXELS, ImageSource, Preprocessing, square
from model.weights.checkpoints import LoadedModel
from model.weights.loading import load_model

log = logging.getLogger(__name__)


def resolve_device(device: str | None = None) -> torch.device:
    """'auto' (or None): CUDA when present, else CPU. An unavailable CUDA request is a clear error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested, but no CUDA device is available")
    return resolved


@dataclass
class Embeddings:
    """Descriptors of the images that decoded, in input order, plus those that did not."""

    global_desc: np.ndarray  # (N, D) float32
    local: np.ndarray  # (N, h, w, C) float32
    names: list[str]
    local_mode: LocalMode
    feature_block: FeatureBlock
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)


class FeatureExtractor:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        local_mode: LocalMode | str | None = None,
        feature_block: FeatureBlock | str | None = None,
        image_size: int | None = None,
        exif_transpose: bool = True,
        batch_size: int = 8,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        model_dtype: ModelDtype | str | None = None,
    ) -> None:
        self.model = loaded.model
        self.info = loaded.info
        self.device = next(self.model.parameters()).device
        self.local_mode = self.info.check_local_mode(LocalMode(local_mode or self.info.default_local_mode))
        # None: the checkpoint's default (the paper's final-norm path for trained SelaVPR checkpoints)
        self.feature_block = self.info.check_feature_block(
            loaded.default_feature_block if feature_block is None else feature_block,
            self.local_mode,
            self.model.cfg.vit.depth,
        )
        self.preprocessing = Preprocessing(
            image_size=square(image_size or self.info.image_size),
            exif_transpose=exif_transpose,
            max_pixels=max_pixels,
        )
        self.batch_size = batch_size
        self.model_dtype = resolve_model_dtype(model_dtype)
        if (
            self.model_dtype is ModelDtype.BFLOAT16
            and self.device.type == "cpu"
            and not cpu_has_native_bfloat16()
        ):
            log.warning("this CPU has no bfloat16 dot products: a bfloat16 forward runs slower than float32")

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike = "default", device: str | None = None, **kwargs):
        return cls(load_model(checkpoint, resolve_device(device)), **kwargs)

    @classmethod
    def from_options(cls, options: ModelOptions, **kwargs) -> FeatureExtractor:
        """The model `options` describe; `kwargs`: batch_size, max_pixels."""
        return cls.with_options(
            load_model(options.checkpoint, resolve_device(options.device)), options, **kwargs
        )

    @classmethod
    def with_options(cls, loaded: LoadedModel, options: ModelOptions, **kwargs) -> FeatureExtractor:
        """An extractor of an already loaded model (options.checkpoint and device are not read)."""
        return cls(
            loaded,
            local_mode=options.local_mode,
            feature_block=options.feature_block,
            image_size=options.image_size,
            exif_transpose=options.exif_transpose,
            model_dtype=options.model_dtype,
            **kwargs,
        )

    def output_shapes(self) -> tuple[int, tuple[int, int, int]]:
        """(global descriptor length, local map shape (h, w, C)) at this extractor's input size."""
        vit = self.model.cfg.vit
        gh, gw = (side // vit.patch_size for side in self.preprocessing.image_size)
        if self.local_mode is LocalMode.LOCAL_HEAD:
            return vit.embed_dim, (local_side(gh), local_side(gw), self.model.cfg.local_head_channels[1])
        return vit.embed_dim, (gh, gw, vit.embed_dim)

    @torch.inference_mode()
    def extract_tensors(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) preprocessed batch -> (global (B, D), local (B, h, w, C)) on the model's device."""
        with autocast(self.model_dtype, self.device):
            features = self.model(images.to(self.device), self.local_mode, self.feature_block)
        return features.global_desc.float(), features.local.float()

    def embed(self, sources: Sequence[ImageSource], names: Sequence[str] | None = None) -> Embeddings:
        """Decode, preprocess and encode; undecodable images are skipped and reported, never fatal."""
        names = list(names) if names is not None else [str(s) for s in sources]
        globals_, locals_, kept, skipped = [], [], [], []
        for batch_names, batch in self._decoded_batches(sources, names, skipped):
            g, loc = self.extract_tensors(torch.stack(batch))
            globals_.append(g.float().cpu().numpy())
            locals_.append(loc.float().cpu().numpy())
            kept += batch_names
        dim = self.model.cfg.vit.embed_dim
        return Embeddings(
            global_desc=np.concatenate(globals_) if globals_ else np.zeros((0, dim), np.float32),
            local=np.concatenate(locals_) if locals_ else np.zeros((0, 0, 0, 0), np.float32),
            names=kept,
            local_mode=self.local_mode,
            feature_block=self.feature_block,
            skipped=skipped,
        )

    def _decoded_batches(
        self, sources: Iterable[ImageSource], names: Sequence[str], skipped: list[tuple[str, str]]
    ) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
        batch_names: list[str] = []
        batch: list[torch.Tensor] = []
        for source, name in zip(sources, names, strict=True):
            try:
                batch.append(self.preprocessing.load(source, name))
                batch_names.append(name)
            except ImageDecodeError as exc:
                log.warning("skipping %s", exc)
                skipped.append((name, str(exc)))
            if len(batch) == self.batch_size:
                yield batch_names, batch
                batch_names, batch = [], []
        if batch:
            yield batch_names, batch
