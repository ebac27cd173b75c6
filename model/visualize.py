"""A side-by-side picture of two images with their mutual matches drawn as lines."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

from model.config import PATCH_SIZE

PANEL_HEIGHT = 480
GAP = 10


def position_to_pixel(
    flat_index: np.ndarray, map_hw: tuple[int, int], input_hw: tuple[int, int], image_wh: tuple[int, int]
) -> np.ndarray:
    """Flat local-map positions -> (n, 2) x, y pixel centres in the original image.

    A g x g patch grid covers the network input; a local map of side n spans it with (g - 1) / (n - 1)
    patches per step (1 for patch tokens, 1/4 for the 4g-3 local head). The input was the whole image
    resized, so scaling back is per axis.
    """
    rows, cols = np.divmod(np.asarray(flat_index), map_hw[1])
    coords = []
    for pos, n, side, extent in (
        (cols, map_hw[1], input_hw[1], image_wh[0]),
        (rows, map_hw[0], input_hw[0], image_wh[1]),
    ):
        grid = side // PATCH_SIZE
        step = (grid - 1) / (n - 1) if n > 1 else 0.0
        coords.append((pos * step + 0.5) * PATCH_SIZE * extent / side)
    return np.stack(coords, axis=1)


def draw_matches(
    image_a: Image.Image,
    image_b: Image.Image,
    points_a: np.ndarray,
    points_b: np.ndarray,
    max_lines: int = 300,
    seed: int = 0,
) -> Image.Image:
    """Both images scaled to one height, side by side; up to max_lines matches (evenly sampled)."""
    scale_a, scale_b = PANEL_HEIGHT / image_a.height, PANEL_HEIGHT / image_b.height
    panel_a = image_a.resize((max(1, round(image_a.width * scale_a)), PANEL_HEIGHT))
    panel_b = image_b.resize((max(1, round(image_b.width * scale_b)), PANEL_HEIGHT))
    canvas = Image.new("RGB", (panel_a.width + GAP + panel_b.width, PANEL_HEIGHT), "white")
    canvas.paste(panel_a, (0, 0))
    canvas.paste(panel_b, (panel_a.width + GAP, 0))
    draw = ImageDraw.Draw(canvas)
    keep = np.linspace(0, len(points_a) - 1, min(max_lines, len(points_a))).round().astype(int)
    hues = np.random.default_rng(seed).random(len(keep))
    offset = panel_a.width + GAP
    for hue, i in zip(hues, keep, strict=True):
        color = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue, 0.9, 1.0))
        xa, ya = points_a[i] * scale_a
        xb, yb = points_b[i] * scale_b
        draw.line([(xa, ya), (xb + offset, yb)], fill=color, width=1)
        for x, y in ((xa, ya), (xb + offset, yb)):
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=color)
    return canvas
