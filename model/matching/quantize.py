"""int8 maps as the engine takes them: one scale per map (precision.int8_limit bounds it), values
rounded half to even and clamped to [-127, 127]. On CPU the elementwise step runs in one C pass
(native.quantize_int8, the same bits); elsewhere, or without the library, in torch."""

from __future__ import annotations

import math

import torch

import model.matching.native as native
from model.matching.precision import int8_limit


def quantize_int8(maps: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, L, C) float maps -> int8, one scale per map: the largest component goes to 127, unless that
    would make a vector long enough to break `int8_limit` (|a.b| <= |a||b|; rounding adds at most
    0.5 * sqrt(C) to a length)."""
    x = maps.float()
    scales = int8_scales(x, bits)
    quantized = native.quantize_int8(x, scales)
    if quantized is not None:
        return quantized
    return torch.mul(x, scales.view(-1, *([1] * (x.ndim - 1)))).round_().clamp_(-127, 127).to(torch.int8)


def int8_scales(maps: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, L, C) float32 maps -> (n,) the factor quantize_int8 multiplies each map by."""
    max_norm = math.sqrt(int8_limit(bits)) - 0.5 * math.sqrt(maps.shape[-1])
    flat = maps.flatten(1)
    # max |x| without an abs() copy, and one rounded copy changed in place: half the time of the
    # straightforward version (which the C kernels' int8 pass waits for), the same bits
    peak = torch.maximum(flat.amax(dim=1), flat.amin(dim=1).neg_()).clamp_(min=1e-12)
    longest = maps.norm(dim=-1).flatten(1).amax(dim=1).clamp_(min=1e-12)
    return torch.minimum(127.0 / peak, max_norm / longest)
