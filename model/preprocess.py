"""Images to normalised tensors, the authors' two ways.

- Test path (spec 7, the inference default): ToTensor -> ImageNet normalisation -> resize the *normalised
  tensor* bilinearly without antialiasing. Their published numbers need exactly this.
- Train path (spec 6): PIL bilinear (antialiased) resize -> ToTensor -> normalisation.

Decoding is ours and more forgiving than theirs: EXIF orientation is applied (theirs ignores it; pass
`exif_transpose=False` for their behaviour), every Pillow mode becomes RGB, HEIC/AVIF decode.
"""

from __future__ import annotations

import io
import os
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

    def load(self, source: ImageSource, name: str | None = None) -> torch.Tensor:
        """Decode and transform one image to a (3, H, W) float32 tensor."""
        return self.transform(open_rgb(source, self.exif_transpose, self.max_pixels, name))

    def transform(self, image: Image.Image) -> torch.Tensor:
        if self.resize is ResizeMode.TRAIN:
            h, w = self.image_size
            return normalize(to_tensor(image.resize((w, h), Image.Resampling.BILINEAR)))
        return resize_tensor(normalize(to_tensor(image)), self.image_size)


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


def open_rgb(
    source: ImageSource,
    exif_transpose: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Decode fully (so truncation surfaces here), orient, and convert any mode to RGB."""
    label = name or (str(source) if isinstance(source, str | os.PathLike) else "<upload>")
    if isinstance(source, bytes):
        if not source:
            raise ImageDecodeError(f"{label}: empty file (0 bytes)", ImageDecodeError.EMPTY)
        source = io.BytesIO(source)
    elif (
        isinstance(source, str | os.PathLike) and Path(source).is_file() and Path(source).stat().st_size == 0
    ):
        raise ImageDecodeError(f"{label}: empty file (0 bytes)", ImageDecodeError.EMPTY)
    try:
        with Image.open(source) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"{label}: {width}x{height} pixels exceeds the limit of {max_pixels:,} "
                    "(possible decompression bomb)",
                    ImageDecodeError.TOO_MANY_PIXELS,
                )
            image.load()
            oriented = _exif_transposed(image) if exif_transpose else image
            rgb = to_rgb(oriented)
            # The opened image is unusable once closed: hand back an independent one.
            return rgb.copy() if rgb is image else rgb
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
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(
            f"{label}: corrupt or truncated image ({exc})", ImageDecodeError.CORRUPT
        ) from None


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
