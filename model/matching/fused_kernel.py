"""The Triton kernel behind fused.py (imported only where Triton is installed; see fused.py for what it
computes and why)."""

import triton
import triton.language as tl


@triton.jit
def best_matches_kernel(
    cand_ptr,  # (K, L_c, C)
    query_ptr,  # (L_q, C)
    best_q_ptr,  # (K, L_c) int64 out: best query position of each candidate position
    part_val_ptr,  # (K, blocks, L_q) float32 out: best value per query position within a block
    part_idx_ptr,  # (K, blocks, L_q) int32 out: its candidate position
    l_c: tl.constexpr,  # map shapes are fixed per index: one compilation each
    l_q: tl.constexpr,
    blocks: tl.constexpr,
    C: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    IS_INT: tl.constexpr,
):
    block = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    rows = block * BM + tl.arange(0, BM)
    chans = tl.arange(0, C)
    row_ok = rows < l_c
    cand = tl.load(cand_ptr + (k * l_c + rows[:, None]) * C + chans[None, :], mask=row_ok[:, None], other=0)
    best_val = tl.full((BM,), float("-inf"), tl.float32)
    best_idx = tl.full((BM,), 0, tl.int32)
    for j0 in range(0, l_q, BN):
        cols = j0 + tl.arange(0, BN)
        col_ok = cols < l_q
        query = tl.load(query_ptr + cols[:, None] * C + chans[None, :], mask=col_ok[:, None], other=0)
        if IS_INT:
            sim = tl.dot(cand, tl.trans(query), out_dtype=tl.int32).to(tl.float32)  # exact below 2^24
        else:
            sim = tl.dot(cand, tl.trans(query))
        # candidate positions: the first query position of the row maximum, carried across blocks
        row_sim = tl.where(col_ok[None, :], sim, float("-inf"))
        tile_val = tl.max(row_sim, axis=1)
        tile_idx = tl.argmax(row_sim, axis=1, tie_break_left=True).to(tl.int32) + j0
        better = tile_val > best_val  # strictly: an earlier block keeps a tie
        best_idx = tl.where(better, tile_idx, best_idx)
        best_val = tl.where(better, tile_val, best_val)
        # query positions: the first candidate position of the column maximum within this block
        col_sim = tl.where(row_ok[:, None], sim, float("-inf"))
        col_val = tl.max(col_sim, axis=0)
        col_idx = tl.argmax(col_sim, axis=0, tie_break_left=True).to(tl.int32) + block * BM
        part = (k * blocks + block) * l_q + cols
        tl.store(part_val_ptr + part, col_val, mask=col_ok)
        tl.store(part_idx_ptr + part, col_idx, mask=col_ok)
    tl.store(best_q_ptr + k * l_c + rows, best_idx.to(tl.int64), mask=row_ok)
