"""The dtype the model's forward runs in: float32, or bfloat16 / float16 through autocast.

Autocast keeps the weights in float32 and runs the matmuls and convolutions in the reduced dtype
(softmax, layer norms and reductions stay float32), so one loaded model serves every dtype. On CPU,
bfloat16 only pays where the hardware has bfloat16 dot products (AVX-512 BF16 or AMX); elsewhere oneDNN
emulates it and the forward gets slower: measure before choosing (bench/model_dtype.py). The outputs are
always returned as float32.
"""

from __future__ import annotations

import contextlib
import functools
from enum import StrEnum
from pathlib import Path

import torch


class ModelDtype(StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


TORCH_DTYPES = {ModelDtype.BFLOAT16: torch.bfloat16, ModelDtype.FLOAT16: torch.float16}


def resolve_model_dtype(dtype: str | ModelDtype | None) -> ModelDtype:
    try:
        return ModelDtype(dtype or ModelDtype.FLOAT32)
    except ValueError:
        raise ValueError(
            f"unknown model dtype {dtype!r}; expected one of {[d.value for d in ModelDtype]}"
        ) from None


def autocast(dtype: ModelDtype, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward's context: nothing for float32, torch.autocast otherwise."""
    if dtype is ModelDtype.FLOAT32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=TORCH_DTYPES[dtype])


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """AVX-512 BF16 or AMX: where a CPU runs bfloat16 matmuls faster than float32."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))
