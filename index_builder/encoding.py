"""The build's encoding stage, pluggable: images -> (global descriptors, stored local maps).

The builder plans the model batches (consecutive runs of the images to encode, `plan_batches`) and hands
them to an `Encoder`; every encoder decodes with `decode_reference` and runs `encode_tensors` on each
planned batch, so the forward passes, and so the stored features, are the same whichever encoder runs
them (a batch's composition can change float results, hence the plan is made once, by the builder).
`LocalEncoder` runs in this process; `index_builder.ray_build.RayDataEncoder` on a Ray Data actor pool.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from index_builder.locations import exif_location_of
from index_builder.sources import ReferenceImage
from index_builder.store import encode_local
from model.errors import ImageDecodeError
from model.extractor import FeatureExtractor
from model.preprocess import Preprocessing, open_rgb

# (width, height, EXIF GPS location) of a decoded image
ImageMeta = tuple[int, int, dict[str, Any] | None]
# a decoded image, or why it could not be decoded
Decoded = tuple[ImageMeta, torch.Tensor] | str


@dataclass
class EncodedBatch:
    """One planned batch, encoded: `images` (the decodable ones, in plan order) with their `metas`,
    `global_desc` (n, D) float32 and `local` (the `encode_local` arrays, n rows each); `skipped` holds
    (rel_path, reason) of the batch's images that could not be decoded."""

    images: list[ReferenceImage]
    metas: list[ImageMeta]
    global_desc: np.ndarray
    local: dict[str, np.ndarray]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.images) + len(self.skipped)


class Encoder(Protocol):
    def default_batch_size(self) -> int:
        """Images per planned batch when the build does not say."""
        ...

    def encode(self, batches: Sequence[Sequence[ReferenceImage]]) -> Iterator[EncodedBatch]:
        """Each planned batch encoded, yielded in plan order as soon as it (and those before it) are done."""
        ...


def plan_batches(todo: Sequence[ReferenceImage], batch_size: int) -> list[list[ReferenceImage]]:
    """Consecutive runs of `batch_size` images; an undecodable image leaves its batch one smaller."""
    return [list(todo[i : i + batch_size]) for i in range(0, len(todo), batch_size)]


def decode_reference(image: ReferenceImage, prep: Preprocessing) -> Decoded:
    try:
        rgb = open_rgb(image.abs_path, prep.exif_transpose, prep.max_pixels, image.rel_path)
    except ImageDecodeError as exc:
        return str(exc)
    exif = exif_location_of(image.abs_path)
    return (rgb.width, rgb.height, asdict(exif) if exif else None), prep.transform(rgb)


def encode_decoded(
    extractor: FeatureExtractor,
    local_dtype: str,
    batch: Sequence[ReferenceImage],
    decoded: Sequence[Decoded],
) -> EncodedBatch:
    """The forward pass over a planned batch's decodable images, features as stored."""
    images, metas, tensors, skipped = [], [], [], []
    for image, result in zip(batch, decoded, strict=True):
        if isinstance(result, str):
            skipped.append((image.rel_path, result))
        else:
            images.append(image)
            metas.append(result[0])
            tensors.append(result[1])
    global_dim, local_shape = extractor.output_shapes()
    if tensors:
        global_t, local_t = extractor.extract_tensors(torch.stack(tensors))
        global_desc = global_t.float().cpu().numpy()
        local = encode_local(local_t.float().cpu().numpy(), local_dtype)
    else:  # every image of the batch was undecodable
        global_desc = np.empty((0, global_dim), np.float32)
        local = encode_local(np.empty((0, *local_shape), np.float32), local_dtype)
    return EncodedBatch(images, metas, global_desc, local, skipped)


class LocalEncoder:
    """Encodes in this process: worker threads decode and preprocess up to two batches ahead of the model
    (Pillow and torch release the GIL, so decoding overlaps the forward pass)."""

    def __init__(self, extractor: FeatureExtractor, local_dtype: str, decode_workers: int = 2) -> None:
        self.extractor, self.local_dtype, self.decode_workers = extractor, local_dtype, decode_workers

    def default_batch_size(self) -> int:
        return 64 if self.extractor.device.type == "cuda" else 16

    def encode(self, batches: Sequence[Sequence[ReferenceImage]]) -> Iterator[EncodedBatch]:
        prep = self.extractor.preprocessing
        with ThreadPoolExecutor(max_workers=max(1, self.decode_workers), thread_name_prefix="decode") as pool:
            pending: list[tuple[Sequence[ReferenceImage], list[Future]]] = []
            for batch in batches:
                pending.append((batch, [pool.submit(decode_reference, image, prep) for image in batch]))
                if len(pending) > 2:
                    yield self._encode(*pending.pop(0))
            for batch, futures in pending:
                yield self._encode(batch, futures)

    def _encode(self, batch: Sequence[ReferenceImage], futures: list[Future]) -> EncodedBatch:
        return encode_decoded(self.extractor, self.local_dtype, batch, [f.result() for f in futures])
