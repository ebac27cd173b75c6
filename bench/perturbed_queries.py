"""Query-like variants of the shared images: a larger labelled query set that no fit has seen.

A real query differs from the database's photo of the same place in framing, camera and light. Each
held-out view of a place is turned into `variants` new photos, each with all of (strengths drawn with a
fixed seed):

- framing: a crop keeping 65-90 % of the width and height at a random position, scaled back to the
  original size (a step closer, a step aside);
- rotation: -6 to +6 degrees about the centre (a tilted phone), then cropped to hide the corners;
- light: brightness and contrast x 0.6 to 1.4, gamma 0.7 to 1.5;
- camera: half the variants re-compressed as JPEG at quality 20 to 70, half blurred (Gaussian, radius
  0.5 to 2 px).

The variants are written to a temporary dataset in the VPR-datasets-downloader layout, next to the
database (the place's other two views), never into the repository. Variants of one photo share its
group (`photo_group`): they are not independent queries, and the evaluation resamples them together.

    python -m bench.perturbed_queries OUT_DIR [--query-view i2] [--variants 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from bench.common import DEFAULT_SHARED

VIEWS = ("i0", "i1", "i2")


def perturbed(image: Image.Image, rng: np.random.Generator, variant: int) -> Image.Image:
    """One query-like variant of `image` (see the module's list)."""
    image = image.convert("RGB")
    width, height = image.size
    angle = float(rng.uniform(-6, 6))
    rotated = image.rotate(angle, resample=Image.Resampling.BILINEAR)
    # the largest centred box without the rotation's empty corners, then a random framing inside it
    hide = 1.0 / (abs(math.cos(math.radians(angle))) + abs(math.sin(math.radians(angle))) * width / height)
    keep_w, keep_h = (float(rng.uniform(0.65, 0.9)) * hide for _ in range(2))
    left = (1 - keep_w) / 2 + float(rng.uniform(-1, 1)) * (hide - keep_w) / 2
    top = (1 - keep_h) / 2 + float(rng.uniform(-1, 1)) * (hide - keep_h) / 2
    box = (left * width, top * height, (left + keep_w) * width, (top + keep_h) * height)
    out = rotated.resize((width, height), Image.Resampling.BICUBIC, box=box)
    out = ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.6, 1.4)))
    out = ImageEnhance.Contrast(out).enhance(float(rng.uniform(0.6, 1.4)))
    gamma = float(rng.uniform(0.7, 1.5))
    out = out.point([round(255 * (v / 255) ** gamma) for v in range(256)] * 3)
    if variant % 2:
        return out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    return _recompressed(out, int(rng.integers(20, 71)))


def _recompressed(image: Image.Image, quality: int) -> Image.Image:
    from io import BytesIO

    buffer = BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def make_perturbed_dataset(
    root: Path,
    shared: Path = DEFAULT_SHARED,
    query_view: str = "i2",
    variants: int = 10,
    seed: int = 0,
    offset_m: float = 3.0,
) -> Path:
    """Database: the two other views of each place (as bench.shared_dataset lays them out); queries:
    `variants` perturbed copies of the `query_view` photo of each place, a few metres from the place."""
    rng = np.random.default_rng([seed, VIEWS.index(query_view)])
    for place_dir in sorted((shared / "matching_triplets").iterdir()):
        k = int(place_dir.name[1:])
        for view in VIEWS:
            src = next((place_dir / view).iterdir())
            if view != query_view:
                dst = (
                    root
                    / "images"
                    / "test"
                    / "database"
                    / f"@{1000.0 * k:.2f}@0.00@55@H@@@{place_dir.name}_{view}@.jpg"
                )
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dst)
                continue
            photo = Image.open(src)
            for n in range(variants):
                name = f"@{1000.0 * k + offset_m:.2f}@0.00@55@H@@@{place_dir.name}_{view}_v{n:02d}@.jpg"
                dst = root / "images" / "test" / "queries" / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                perturbed(photo, rng, n).save(dst, quality=95)
    return root


def photo_group(path: Path) -> str:
    """The photo a query was made from ('p3_i2' for '...@p3_i2_v07@.jpg'): the bootstrap's group."""
    tag = path.stem.strip("@").split("@")[-1]
    return tag.rsplit("_v", 1)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.perturbed_queries", description=__doc__.split("\n")[0]
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--query-view", default="i2", choices=VIEWS)
    parser.add_argument("--variants", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED)
    args = parser.parse_args(argv)
    make_perturbed_dataset(args.out_dir, args.shared_data, args.query_view, args.variants, args.seed)
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
