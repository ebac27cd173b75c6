"""Tiny random models for tests that do not need real weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.config import SelaVPRConfig, ViTConfig
from model.selavpr import SelaVPR


def tiny_vit(num_registers: int = 0, depth: int = 2, dim: int = 128, pos_grid: int = 6) -> ViTConfig:
    """Small but honest: 64-channel heads as in every DINOv2 size, a real interpolated position table."""
    return ViTConfig(
        embed_dim=dim, depth=depth, num_heads=dim // 64, num_registers=num_registers, pos_grid=pos_grid
    )


def randomize(model: SelaVPR, seed: int = 0) -> SelaVPR:
    """Random weights everywhere, adapters included (non-zero D_fc2), LayerScale well away from 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.copy_(0.05 + 0.3 * torch.rand(param.shape, generator=gen))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(0.5 + torch.rand(param.shape, generator=gen))
            elif name.endswith(".p"):
                param.fill_(3.3)
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    return model.eval()


def tiny_model(num_registers: int = 0, adapters: bool = True, seed: int = 0) -> SelaVPR:
    return randomize(SelaVPR(SelaVPRConfig(tiny_vit(num_registers), adapters=adapters)), seed)


def authors_checkpoint(path: Path, model, legacy: bool = False) -> Path:
    """The layout of SelaVPR_msls.pth: a training dict, `module.` keys, numpy objects beside them."""
    state = {"module." + k: v for k, v in model.state_dict().items()}
    ckpt = {
        "epoch_num": 7,
        "model_state_dict": state,
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
        "recalls": np.array([90.8, 96.4, 97.2, 98.0]),
        "best_r5": np.float64(96.4),
        "not_improved_num": 0,
    }
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    return path


def dinov2_checkpoint(path: Path, model) -> Path:
    """An official DINOv2 backbone file: a plain state dict without adapters or SelaVPR parts."""
    state = {
        k.removeprefix("backbone."): v
        for k, v in model.state_dict().items()
        if k.startswith("backbone.") and ".adapter" not in k
    }
    torch.save(state, path)
    return path


def tiny_checkpoint(directory: Path, seed: int = 11) -> Path:
    """A tiny SelaVPR with a trained-looking local head, in the project format, at 112 px."""
    from model.weights.project_format import save_checkpoint

    return save_checkpoint(
        tiny_model(seed=seed),
        directory,
        description=f"tiny test model (seed {seed})",
        trained_adapters=True,
        trained_local_head=True,
        image_size=112,
    )


def noise_images(directory: Path, count: int, size: tuple[int, int] = (96, 72), seed: int = 0) -> list[Path]:
    """Distinct small PNGs (random pixels), for tests that need many different references."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"noise_{seed}_{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# The shared triplets' ten places, given locations for sharding tests: GardensPoint (Brisbane), one place
# every 100 m going north (the shared data has no GPS; its README says to make some up).
PLACE_LAT, PLACE_LON = -27.4772, 153.0281


def place_location(place: int) -> tuple[float, float]:
    return PLACE_LAT + place * 0.0009, PLACE_LON


def shared_references(shared_data: Path, refs: Path) -> Path:
    """The 32 shared images copied under refs (never into the repo), the triplets located by place
    through locations.csv, the Tokyo pair as it is (the query has EXIF GPS, the database image none)."""
    import shutil

    shutil.copytree(shared_data / "matching_triplets", refs / "matching_triplets")
    shutil.copytree(shared_data / "tokyo_pair", refs / "tokyo_pair")
    rows = ["path,lat,lon"]
    for path in sorted((refs / "matching_triplets").glob("p*/i*/*.jpg")):
        lat, lon = place_location(int(path.parts[-3][1:]))
        rows.append(f"{path.relative_to(refs).as_posix()},{lat},{lon}")
    (refs / "locations.csv").write_text("\n".join(rows) + "\n")
    return refs


def mirrored_jpeg(path: Path) -> bytes:
    """A reference photo the index does not hold: a shared image mirrored."""
    import io

    from PIL import Image, ImageOps

    buffer = io.BytesIO()
    ImageOps.mirror(Image.open(path).convert("RGB")).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()
