"""A fused GPU kernel (Triton) for the engine's inner loop: similarities of one block of candidate
positions against all query positions, reduced to both argmaxes in registers. The similarity tile never
reaches GPU memory, which bounds the tiled engine there (reducers read every tile back several times).

For the 16-bit and int8 precisions on CUDA. Float32 stays on cuBLAS: its products are the authors' to the
bit, and a kernel of our own would sum in another order and could move a near-tie. With 16-bit operands
the similarities stay float32 here (the tiles round them to 16 bits); int8 matches the tiles exactly.

Each program takes one candidate and BM of its positions, loops over the query in blocks of BN:
- best query position of each candidate position: a running (max, first argmax) in registers;
- best candidate position of each query position, within this block: written as a partial (value,
  index) per block; the host takes the first maximum over the blocks, so ties go to the lowest index on
  both sides, as torch.argmax decides.

Off by default where Triton is missing or SELAVPR_FUSED_MNN=0; the engine then runs its tiles.
`TRITON_INTERPRET=1` runs the kernel on CPU tensors (the tests do).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys

import torch

from model.matching.precision import Precision

FUSED_PRECISIONS = (Precision.BFLOAT16, Precision.FLOAT16, Precision.INT8)
# Candidate positions per program, query positions per step, warps per program. The best of six shapes
# on an H200 at K = 100, 61x61x128 (bench.rerank --fused-sweep): 2.67 ms bfloat16 and 2.53 ms int8 per
# query, against 3.18 / 2.85 ms for 64 x 64 and up to 5.1 ms for the others (docs/benchmarks.md, "GPU check").
BLOCK_M, BLOCK_N, NUM_WARPS = 128, 64, 4


@functools.cache
def _kernel():
    """The kernel module, or None without Triton. Built on first use: Triton decides at decoration time
    whether to compile or interpret (TRITON_INTERPRET), so a cleared cache builds it again."""
    name = "model.matching.fused_kernel"
    try:
        return importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
    except ImportError:
        return None


def fused_enabled(device: torch.device, precision: Precision) -> bool:
    """Whether best_matches should use the fused kernel for this device and precision."""
    if precision not in FUSED_PRECISIONS or os.environ.get("SELAVPR_FUSED_MNN", "1") == "0":
        return False
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return (device.type == "cuda" or interpreted) and _kernel() is not None


def fused_best_matches(
    query: torch.Tensor,
    chunk: torch.Tensor,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    num_warps: int = NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query (L_q, C) and candidates (k, L_c, C), both prepared (16-bit or int8, contiguous) ->
    best_c_of_q (k, L_q) int64, best_q_of_c (k, L_c) int64. The block sizes and warps are tuning knobs
    (bench.rerank --fused-sweep); results do not depend on them."""
    module = _kernel()
    query, chunk = _padded_channels(query), _padded_channels(chunk)
    k, l_c, channels = chunk.shape
    l_q = query.shape[0]
    blocks = -(-l_c // block_m)
    device = chunk.device
    best_q = torch.empty(k, l_c, dtype=torch.int64, device=device)
    part_val = torch.empty(k, blocks, l_q, dtype=torch.float32, device=device)
    part_idx = torch.empty(k, blocks, l_q, dtype=torch.int32, device=device)
    is_int = chunk.dtype == torch.int8
    module.best_matches_kernel[(blocks, k)](
        chunk.contiguous(),
        query.contiguous(),
        best_q,
        part_val,
        part_idx,
        l_c=l_c,
        l_q=l_q,
        blocks=blocks,
        C=channels,
        BM=block_m,
        BN=block_n,
        IS_INT=is_int,
        num_warps=num_warps,
    )
    first_block = part_val.argmax(dim=1, keepdim=True)  # torch.argmax: the first maximum, lowest block
    best_c = part_idx.gather(1, first_block).squeeze(1).long()
    return best_c, best_q


def _padded_channels(maps: torch.Tensor) -> torch.Tensor:
    """Zeros appended to the channels up to a power of two >= 16 (what tl.arange and tl.dot take; ViT-S
    patch tokens have 384): zero terms leave every dot product as it was."""
    channels = maps.shape[-1]
    target = max(16, 1 << (channels - 1).bit_length())
    return maps if target == channels else torch.nn.functional.pad(maps, (0, target - channels))
