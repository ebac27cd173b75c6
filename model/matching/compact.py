"""A query map in the form the matching engine uses it in one precision, to send to another process that
counts (a location shard of `serve --engine ray`): int8 values with their scale for int8 (a quarter of
float32's bytes), 16-bit floats for float16 / bfloat16 (half), float32 otherwise.

Counting with it gives exactly the counts of the float32 map: the engine would quantize or cast the query
to these very values itself (engine._prepare passes an int8 query through as it is). The int8 form
depends on the candidates' number of positions (index_bits), which the sender knows from the index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.matching.precision import FLOAT_DTYPES, Precision, index_bits
from model.matching.quantize import int8_scales, quantize_int8


@dataclass(frozen=True)
class CompactQuery:
    """values: (h, w, C) int8, float16, bfloat16 (as its int16 bits: numpy has no bfloat16) or float32.
    scale (int8 only): values / scale approximates the float32 map."""

    values: np.ndarray
    precision: Precision
    scale: float | None = None

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes) + (4 if self.scale is not None else 0)

    def tensor(self, device: torch.device | None = None) -> torch.Tensor:
        """The map as the engine takes it (copied: arrays received from Ray are read-only)."""
        values = torch.from_numpy(np.array(self.values))
        if self.precision is Precision.BFLOAT16:
            values = values.view(torch.bfloat16)
        return values.to(device) if device is not None else values


def compact_query(query_local: torch.Tensor, precision: Precision, candidate_positions: int) -> CompactQuery:
    """A float32 query map (h, w, C) for counting in `precision` against maps of candidate_positions
    positions (h' * w')."""
    if precision is Precision.INT8:
        flat = query_local.float().flatten(0, 1)[None]
        bits = index_bits(flat.shape[1], candidate_positions)
        values = quantize_int8(flat, bits)[0].reshape(query_local.shape)
        return CompactQuery(values.cpu().numpy(), precision, float(int8_scales(flat, bits)[0]))
    if precision in (Precision.FLOAT16, Precision.BFLOAT16):
        values = query_local.to(FLOAT_DTYPES[precision]).cpu()
        as_numpy = values.view(torch.int16) if precision is Precision.BFLOAT16 else values
        return CompactQuery(as_numpy.numpy(), precision)
    return CompactQuery(query_local.float().cpu().numpy(), Precision.FLOAT32)


def check_precision(query: CompactQuery, asked: Precision) -> None:
    """A float32 query counts in any precision; a compacted one only in its own (an int8 query counted
    in float32 would give other counts, silently)."""
    if query.precision is not Precision.FLOAT32 and query.precision is not asked:
        raise ValueError(f"a query map compacted for {query.precision} cannot be counted in {asked}")
