"""Precisions the MNN engine computes similarities in, and how operands are prepared for each.

- float32: exact. The reference every other mode is measured against.
- bfloat16 / float16: operands and similarities rounded to 16 bits (16-bit matmul), argmaxes in float32.
- int8: one scale per map (so argmaxes along either axis are unchanged by it), integer dot products
  (AMX or VNNI on CPU, int8 tensor cores on GPU), exact int32 similarities of the rounded vectors. Integer
  arithmetic makes its results identical on every device.
- int8+float32: int8 counts for every candidate, then float32 recounts of the candidates whose int8
  count comes within the error allowance of the best ones, within a budget (refine.py), so the top of
  the re-ranked list is what float32 gives at close to int8 cost whenever a candidate stands out.

Which precision runs when none is asked for is decided in defaults.py (the rule and its reasons:
docs/reranking.md): int8+float32 only where int8 products have fast hardware and the maps are large
enough for the recounts to pay; exact float32 elsewhere.
"""

from __future__ import annotations

import math
from enum import StrEnum

import torch


class Precision(StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    INT8 = "int8"
    INT8_FLOAT32 = "int8+float32"


FLOAT_DTYPES = {
    Precision.FLOAT32: torch.float32,
    Precision.BFLOAT16: torch.bfloat16,
    Precision.FLOAT16: torch.float16,
}


# How far an int8 count may stray from the float32 count, in units of sqrt(count + 1). The largest seen
# on the shared images is 2.3 (bench/rerank.py, docs/benchmarks.md); 4 leaves room for other data.
INT8_ERROR_SIGMAS = 4.0


def int8_count_error(counts: torch.Tensor) -> torch.Tensor:
    """The allowance |int8 count - float32 count| <= INT8_ERROR_SIGMAS * sqrt(count + 1). An empirical
    bound from measurements, not a proof: flipped matches come from near-ties, whose number grows
    roughly with the square root of the count."""
    return INT8_ERROR_SIGMAS * torch.sqrt(counts.double() + 1)


def index_bits(*lengths: int) -> int:
    """Bits that hold any position index of maps with these many positions."""
    return max(1, math.ceil(math.log2(max(max(lengths), 2))))


def int8_limit(bits: int) -> int:
    """Largest |dot product| of int8 vectors the engine accepts. It packs a position index into the
    low `bits` bits of each similarity, so |dot| * 2^bits + 2^(bits + 1) must fit in int32; and below
    2^22 every partial sum (at most |a||b|) is exact in float32, also with the 1.5 * 2^23 bias of the
    float route (engine.MAGIC_BIAS)."""
    return min(2 ** (31 - bits) - 2, 2**22 - 1)
