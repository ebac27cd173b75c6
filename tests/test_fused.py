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
ROOT = Path(__file__).resolve().parents[1]


def test_fused_kernel_finds_the_tiled_engines_matches():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fused_interpreted.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("fused=True same=True") == 2, run.stdout


def test_fused_kernel_is_never_used_for_float32_or_off_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused.fused_enabled(torch.device("cuda"), Precision.FLOAT32)  # cuBLAS: the authors' bits
    assert not fused.fused_enabled(torch.device("cpu"), Precision.INT8)


def test_fused_kernel_rejects_odd_channel_counts():
    with pytest.raises(ValueError, match="power-of-two channel count"):
        fused.fused_best_matches(
            torch.zeros(4, 24, dtype=torch.float16), torch.zeros(2, 4, 24, dtype=torch.float16)
        )
