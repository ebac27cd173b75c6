"""The ARM kernels (model/matching/_mnn_arm.c), bit for bit against a scalar reference under qemu-user:
no ARM machine runs this suite. `make arm-check` installs Debian's cross compiler and qemu-user (CI runs
it); without them this test skips and says so, except under CI (CI=true), where it fails."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "native" / "arm_check.sh"
TOOLS_ABSENT = 77  # the script's exit status when the cross compiler or qemu-aarch64 is missing


def test_the_arm_kernels_equal_the_scalar_reference_under_qemu():
    run = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=600)
    if run.returncode == TOOLS_ABSENT:
        if os.environ.get("CI"):
            pytest.fail(run.stdout.strip())
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout + run.stderr
    for kernel in ("float32 on NEON", "int8 on dot product", "int8 on i8mm", "int8 quantize on NEON"):
        assert f"ok {kernel}" in run.stdout  # each ran on at least one emulated CPU
    assert "FAIL" not in run.stdout + run.stderr
