"""Decoding and both of the authors' preprocessing paths."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model import preprocess
from model.errors import ImageDecodeError
from model.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MemoryBudget,
    Preprocessing,
    ResizeMode,
    normalize,
    open_rgb,
    resize_tensor,
    to_rgb,
    to_tensor,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(width: int = 90, height: int = 60) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = np.concatenate(
        [
            np.broadcast_to(x, (height, width, 1)),
            np.broadcast_to(y, (height, width, 1)),
            np.full((height, width, 1), 128.0),
        ],
        axis=2,
    )
    return Image.fromarray(rgb.astype(np.uint8))


def test_test_path_normalises_then_resizes_the_tensor(shared_data):
    path = shared_data / "tokyo_pair" / "tokyo_db.png"
    ours = Preprocessing().load(path)
    image = np.asarray(Image.open(path).convert("RGB"))
    raw = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255
    expected = F.interpolate(
        ((raw - MEAN) / STD)[None], size=(224, 224), mode="bilinear", align_corners=False, antialias=False
    )[0]
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_train_path_resizes_the_image_first(shared_data):
    path = shared_data / "tokyo_pair" / "tokyo_db.png"
    train = Preprocessing(resize=ResizeMode.TRAIN).load(path)
    resized = Image.open(path).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    raw = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(train, (raw - MEAN) / STD, atol=1e-6, rtol=0)
    assert (train - Preprocessing().load(path)).abs().max() > 0.05  # the two paths really differ


def test_non_square_and_other_sizes():
    tensor = Preprocessing(image_size=(280, 420)).transform(gradient())
    assert tensor.shape == (3, 280, 420)
    with pytest.raises(ValueError, match="multiples of 14"):
        Preprocessing(image_size=(225, 225))


def test_exif_orientation_is_applied_unless_disabled():
    image = gradient(90, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encoded(image, "JPEG", exif=exif.tobytes())
    assert open_rgb(data).size == (60, 90)
    assert open_rgb(data, exif_transpose=False).size == (90, 60)


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "YCbCr", "LA", "RGBA", "I", "F", "I;16"])
def test_every_mode_becomes_rgb(mode):
    image = gradient().convert("L").convert(mode) if mode in ("I", "F", "I;16") else gradient().convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size


def test_sixteen_bit_greyscale_keeps_its_range():
    array = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    image = Image.open(io.BytesIO(encoded(Image.fromarray(array), "PNG")))
    rgb = np.asarray(open_rgb(io.BytesIO(encoded(image, "PNG"))))
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb[..., 0])) > 200


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 10, 20))
    rgb = np.asarray(open_rgb(encoded(rgba, "PNG")))
    assert tuple(rgb[5, 5]) == (255, 0, 0) and tuple(rgb[5, 15]) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "WEBP"])
def test_phone_formats_decode(fmt):
    rgb = np.asarray(open_rgb(encoded(gradient(), fmt, quality=95)))
    assert rgb.shape == (60, 90, 3)
    assert np.abs(rgb.astype(int) - np.asarray(gradient()).astype(int)).mean() < 8


def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty.jpg: empty file"):
        open_rgb(tmp_path / "empty.jpg")
    with pytest.raises(ImageDecodeError, match="empty file"):
        open_rgb(b"")


def test_truncated_jpeg(shared_data):
    data = (shared_data / "tokyo_pair" / "tokyo_query.jpg").read_bytes()
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        open_rgb(data[: len(data) // 3], name="cut.jpg")


def test_not_an_image_and_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        open_rgb(b"just some text")
    with pytest.raises(ImageDecodeError, match="no such file"):
        open_rgb(tmp_path / "missing.jpg")


def test_pixel_limit_refuses_before_decoding():
    data = encoded(Image.new("L", (4000, 3000)), "PNG")  # small file, 12 megapixels
    with pytest.raises(ImageDecodeError, match="reaches the limit"):
        open_rgb(data, max_pixels=10_000_000)


def test_pixel_limit_is_inclusive():
    data = encoded(Image.new("L", (100, 100)), "PNG")
    with pytest.raises(ImageDecodeError, match="reaches the limit of 10,000"):
        open_rgb(data, max_pixels=10_000)
    assert open_rgb(data, max_pixels=10_001).size == (100, 100)


@pytest.mark.parametrize("size", [(3264, 2448), (2049, 1953), (4001, 1000), (1000, 4001), (5, 900_001)])
def test_large_images_resize_exactly_without_full_size_copies(size, monkeypatch):
    """Above GATHER_ABOVE_PIXELS the test path gathers the pixels it reads: the same tensor, bit for bit."""
    width, height = size
    generator = np.random.default_rng(width)
    image = Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))
    expected = F.interpolate(
        ((to_tensor(image) - MEAN) / STD)[None], size=(224, 224), mode="bilinear", antialias=False
    )[0]
    assert width * height > preprocess.GATHER_ABOVE_PIXELS or size == (3264, 2448)
    monkeypatch.setattr(preprocess, "GATHER_ABOVE_PIXELS", 0)  # the tokyo-sized photo too
    assert torch.equal(Preprocessing().transform(image), expected)
    assert torch.equal(
        Preprocessing(image_size=(280, 420)).transform(image),
        resize_tensor(normalize(to_tensor(image)), (280, 420)),
    )


def test_real_photo_through_the_gather_path_is_identical(shared_data, monkeypatch):
    path = shared_data / "tokyo_pair" / "tokyo_query.jpg"
    today = Preprocessing().load(path)
    monkeypatch.setattr(preprocess, "GATHER_ABOVE_PIXELS", 0)
    assert torch.equal(Preprocessing().load(path), today)


def test_memory_budget_lets_images_wait_their_turn():
    budget = MemoryBudget(100)
    order = []

    def hold(name: str, cost: int, seconds: float) -> None:
        with budget.reserve(cost):
            order.append(f"{name}+")
            time.sleep(seconds)
            order.append(f"{name}-")

    first = threading.Thread(target=hold, args=("a", 80, 0.2))
    first.start()
    time.sleep(0.05)
    hold("b", 1000, 0)  # over the whole budget: runs alone, after a
    first.join()
    assert order == ["a+", "a-", "b+", "b-"] and budget.in_use == 0
