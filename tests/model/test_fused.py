"""The fused GPU kernel (model/matching/fused.py), run by Triton's interpreter on CPU tensors: the same best
matches as the engine's tiles, ties included. The interpreter has no bfloat16 (numpy lacks it): float16
and int8 are checked here, all three on a GPU by the GPU check (bench/gpu.sh)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model.matching.fused as fused
from model.matching.precision import Precision

pytest.importorskip("triton", reason="triton comes with the dev extra (pyproject) on x86-64 Linux")
ROOT = Path(__file__).resolve().parents[2]


def test_fused_kernel_finds_the_tiled_engines_matches():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "model" / "fused_interpreted.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("fused=True same=True") == 4, run.stdout  # 2 precisions x 32 and 24 channels


def test_fused_kernel_is_never_used_for_float32_or_off_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused.fused_enabled(torch.device("cuda"), Precision.FLOAT32)  # cuBLAS: the authors' bits
    assert not fused.fused_enabled(torch.device("cpu"), Precision.INT8)


def test_channels_are_padded_to_what_the_kernel_takes():
    """ViT-S patch tokens have 384 channels: zeros up to 512 (a power of two, as tl.arange needs), which
    change no dot product; the comparison with the tiles runs above with 24 channels."""
    assert fused._padded_channels(torch.ones(2, 384)).shape == (2, 512)
    assert fused._padded_channels(torch.ones(3, 5, 8)).shape == (3, 5, 16)
    same = torch.ones(2, 128)
    assert fused._padded_channels(same) is same
    padded = fused._padded_channels(torch.arange(6.0).reshape(2, 3))
    assert padded.tolist() == [[0, 1, 2] + [0] * 13, [3, 4, 5] + [0] * 13]
