"""Images to normalised tensors, the authors' two ways.

- Test path (spec 7, the inference default): ToTensor -> ImageNet normalisation -> resize the *normalised
  tensor* bilinearly without antialiasing. Their published numbers need exactly this.
- Train path (spec 6): PIL bilinear (antialiased) resize -> ToTensor -> normalisation.

Decoding is ours and more forgiving than theirs: EXIF orientation is applied (theirs ignores it; pass
`exif_transpose=False` for their behaviour), every Pillow mode becomes RGB, HEIC/AVIF decode.
"""

from __future__ import annotations

import functools
import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pillow_heif
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from model.config import DEFAULT_IMAGE_SIZE, PATCH_SIZE
from model.errors import ImageDecodeError

pillow_heif.register_heif_opener()

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Refuse decompression bombs before decoding: 100 megapixels is beyond any phone camera.
DEFAULT_MAX_PIXELS = 100_000_000
# Above this the test resize gathers the pixels it reads instead of making full-size float copies
# (about 36 bytes per pixel): same result, memory independent of the image size.
GATHER_ABOVE_PIXELS = 4_000_000
# What decoding costs per pixel: Pillow keeps RGB as 4 bytes, and the full-size float path adds ~36.
DECODE_BYTES_PER_PIXEL = 4
FLOAT_PATH_BYTES_PER_PIXEL = 36
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif", ".bmp", ".tif", ".tiff"}
)

ImageSource = str | os.PathLike | bytes | BinaryIO


class ResizeMode(StrEnum):
    TEST = "test"  # normalise, then bilinear tensor resize without antialias (authors' evaluation)
    TRAIN = "train"  # antialiased PIL bilinear resize, then normalise (authors' training)


@dataclass(frozen=True)
class Preprocessing:
    image_size: tuple[int, int] = (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)  # (height, width)
    resize: ResizeMode = ResizeMode.TEST
    exif_transpose: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        for side in self.image_size:
            if side <= 0 or side % PATCH_SIZE:
                raise ValueError(f"image size {self.image_size} must be positive multiples of {PATCH_SIZE}")

    def load(
        self, source: ImageSource, name: str | None = None, budget: MemoryBudget | None = None
    ) -> torch.Tensor:
        """Decode and transform one image to a (3, H, W) float32 tensor (within `budget`, if given)."""
        return self.load_sized(source, name, budget)[0]

    def load_sized(
        self, source: ImageSource, name: str | None = None, budget: MemoryBudget | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """`load`, and the decoded image's (width, height) as oriented."""
        with decoded_rgb(source, self.exif_transpose, self.max_pixels, name, budget) as (_, rgb):
            return self.transform(rgb), rgb.size

    def transform(self, image: Image.Image) -> torch.Tensor:
        if self.resize is ResizeMode.TRAIN:
            h, w = self.image_size
            return normalize(to_tensor(image.resize((w, h), Image.Resampling.BILINEAR)))
        return resize_image_test(image, self.image_size)


def square(image_size: int) -> tuple[int, int]:
    return (image_size, image_size)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [0, 1], as torchvision's ToTensor computes it."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def normalize(tensor: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=tensor.dtype).view(-1, 1, 1)
    return tensor.sub(mean).div(std)


def resize_tensor(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=False, no antialias: torchvision 0.15's tensor resize."""
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    return F.interpolate(tensor[None], size=size, mode="bilinear", align_corners=False, antialias=False)[0]


def resize_image_test(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """The test path: normalise, then bilinear without antialias, bit-for-bit as torch computes it.

    Up to GATHER_ABOVE_PIXELS, literally that (full-size float copies, as the authors). Above, without
    them: bilinear without antialias reads only the 2 x 2 source pixels around each output pixel, so
    those rows and columns are gathered from the uint8 image, normalised, and blended with torch's own
    source indices and weights, in torch's arithmetic (see `_torch_uses_fma`). Memory is then O(output)
    whatever the image size. Measured identical on real photos and random sizes
    (tests/model/test_preprocess)."""
    width, height = image.size
    if width * height <= GATHER_ABOVE_PIXELS:
        return resize_tensor(normalize(to_tensor(image)), size)
    fused = _torch_uses_fma()
    rows, row_weights = _linear_taps(height, size[0], fused)
    cols, col_weights = _linear_taps(width, size[1], fused)
    taps = normalize(to_tensor(Image.fromarray(_gather(image, rows, cols))))  # (3, 2 oh, 2 ow)
    return _blend(taps.view(3, size[0], 2, size[1], 2), row_weights, col_weights, fused)


def _blend(
    taps: torch.Tensor, row_weights: torch.Tensor, col_weights: torch.Tensor, fused: bool
) -> torch.Tensor:
    """out = top * wy0 + bottom * wy1, top/bottom = left * wx0 + right * wx1 (torch's order)."""
    wy0, wy1 = row_weights[:, 0].view(-1, 1), row_weights[:, 1].view(-1, 1)
    wx0, wx1 = col_weights[:, 0], col_weights[:, 1]
    top = _mul_add(taps[:, :, 0, :, 0], wx0, taps[:, :, 0, :, 1] * wx1, fused)
    bottom = _mul_add(taps[:, :, 1, :, 0], wx0, taps[:, :, 1, :, 1] * wx1, fused)
    return _mul_add(top, wy0, bottom * wy1, fused).contiguous()


def _mul_add(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | float, fused: bool) -> torch.Tensor:
    """a * b + c in float32, rounded once (a fused multiply-add, via float64) or twice."""
    if fused:
        return (a.double() * b.double() + (c.double() if isinstance(c, torch.Tensor) else c)).float()
    return a * b + c


def _linear_taps(in_size: int, out_size: int, fused: bool) -> tuple[np.ndarray, torch.Tensor]:
    """Source indices (out, 2) and weights (out, 2) as torch's CPU upsample computes them in float32
    (align_corners=False: src = scale * (dst + 0.5) - 0.5, clamped at 0)."""
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    centre = torch.arange(out_size, dtype=torch.float32) + 0.5
    real = _mul_add(scale.expand(out_size), centre, -0.5, fused).clamp_min(0)
    first = real.to(torch.int64)
    lam = (real - first).clamp(0, 1)
    second = first + (first < in_size - 1).to(torch.int64)
    return torch.stack([first, second], dim=1).numpy(), torch.stack([1 - lam, lam], dim=1)


@functools.cache
def _torch_uses_fma() -> bool:
    """Whether this machine's torch kernel fuses multiply-adds (its AVX2 build does, its baseline build
    does not): whichever arithmetic reproduces it on a small random image is used for large ones."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(3, 61, 83, generator=generator)
    expected = resize_tensor(probe, (45, 29))
    for fused in (True, False):
        rows, row_weights = _linear_taps(61, 45, fused)
        cols, col_weights = _linear_taps(83, 29, fused)
        taps = probe[:, rows.reshape(-1)][:, :, cols.reshape(-1)].view(3, 45, 2, 29, 2)
        if torch.equal(_blend(taps, row_weights, col_weights, fused), expected):
            return fused
    return True  # neither exact (not seen): the fused form, within 1 ulp


def _gather(image: Image.Image, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """uint8 (2 oh, 2 ow, 3): pixel [rows[i, a], cols[j, b]] at [2 i + a, 2 j + b]. Reads one source row
    at a time, so no full-size copy of the image is made."""
    flat_cols = cols.reshape(-1)
    picked = {}
    for y in np.unique(rows):
        line = np.asarray(image.crop((0, int(y), image.size[0], int(y) + 1)), dtype=np.uint8)
        picked[int(y)] = line[0, flat_cols]
    return np.stack([picked[int(y)] for y in rows.reshape(-1)])


def open_rgb(
    source: ImageSource,
    exif_transpose: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Decode fully (so truncation surfaces here), orient, and convert any mode to RGB."""
    with decoded_rgb(source, exif_transpose, max_pixels, name) as (opened, rgb):
        # The opened image is closed when the block ends: hand back an independent one.
        return rgb.copy() if rgb is opened else rgb


@contextmanager
def decoded_rgb(
    source: ImageSource,
    exif_transpose: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    budget: MemoryBudget | None = None,
    validate_only: bool = False,
) -> Iterator[tuple[Image.Image, Image.Image]]:
    """(opened, rgb), valid inside the block: the pixel limit is checked on the header (inclusive), then
    the image decodes within `budget`, which it holds until the block ends.

    `validate_only`: JPEGs decode at 1/8 scale (every byte is still decoded and checked, at 1/64 of the
    memory); the pixels are then not the image's, only its validity is."""
    label = name or (str(source) if isinstance(source, str | os.PathLike) else "<upload>")
    with _decode_errors(label):
        image = Image.open(_readable(source, label))
    try:
        width, height = image.size
        if width * height >= max_pixels:
            raise ImageDecodeError(
                f"{label}: {width}x{height} pixels reaches the limit of {max_pixels:,} "
                "(possible decompression bomb)",
                ImageDecodeError.TOO_MANY_PIXELS,
            )
        with budget.reserve(decode_cost(width, height)) if budget else nullcontext():
            with _decode_errors(label):
                if validate_only and image.format == "JPEG":
                    image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
                oriented = _exif_transposed(image) if exif_transpose else image
                rgb = to_rgb(oriented)
            yield image, rgb
    finally:
        image.close()


def _readable(source: ImageSource, label: str) -> str | os.PathLike | BinaryIO:
    if isinstance(source, bytes):
        if not source:
            raise ImageDecodeError(f"{label}: empty file (0 bytes)", ImageDecodeError.EMPTY)
        return io.BytesIO(source)
    if isinstance(source, str | os.PathLike) and Path(source).is_file() and Path(source).stat().st_size == 0:
        raise ImageDecodeError(f"{label}: empty file (0 bytes)", ImageDecodeError.EMPTY)
    return source


@contextmanager
def _decode_errors(label: str) -> Iterator[None]:
    """Pillow's errors as ImageDecodeError, each with its kind."""
    try:
        yield
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(f"{label}: no such file", ImageDecodeError.MISSING) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"{label}: not a recognised image format", ImageDecodeError.UNRECOGNISED
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{label}: {exc}", ImageDecodeError.TOO_MANY_PIXELS) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(
            f"{label}: corrupt or truncated image ({exc})", ImageDecodeError.CORRUPT
        ) from None


def decode_cost(width: int, height: int) -> int:
    """Bytes that decoding and transforming an image of this size takes at its peak (estimate)."""
    pixels = width * height
    float_path = FLOAT_PATH_BYTES_PER_PIXEL if pixels <= GATHER_ABOVE_PIXELS else 0
    return pixels * (DECODE_BYTES_PER_PIXEL + float_path)


class MemoryBudget:
    """Bytes of images being decoded at once, all threads together: an image waits until it fits, so
    memory is bounded whatever arrives concurrently (one over the whole budget waits to run alone)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity, self.in_use = capacity_bytes, 0
        self._changed = threading.Condition()

    @contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        wanted = min(cost, self.capacity)
        with self._changed:
            self._changed.wait_for(lambda: self.in_use + wanted <= self.capacity)
            self.in_use += wanted
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= wanted
                self._changed.notify_all()


def _exif_transposed(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block must not lose an otherwise good photo
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB. Transparent pixels are composited over white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float greyscale
        return Image.fromarray(_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    values = array.astype(np.float64)
    peak = values.max() if values.size else 0.0
    if array.dtype.kind == "f" and peak <= 1.0:
        values *= 255.0  # float images in [0, 1]
    elif peak > 255:
        values /= 257.0  # 16-bit range to 8-bit: 65535 -> 255
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
