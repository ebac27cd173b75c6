"""Reductions over similarity tiles: each candidate position's best query position (a row argmax,
final within a tile) and each query position's best candidate position (a column argmax, carried
across tiles). Ties go to the lowest index on both sides, as torch.argmax decides, also across tiles.

Index-returning reductions (argmax, max(dim)) run several times slower on CPU than value reductions
(amax), so the CPU reducers put the position index into the low bits of an int32 key and let one amax
find the maximum and its lowest index together: exact for int8 similarities (integers), and a filter
with an exact check for float ones (BucketFloatReducer).
"""

from __future__ import annotations

import torch

INT32_MIN = torch.iinfo(torch.int32).min


class PackedIntReducer:
    """int32 similarity tiles holding `int_offset + dot`: key = dot * 2^b + (2^b - 1 - index)."""

    def __init__(self, l_q: int, r_step: int, bits: int, device: torch.device, int_offset: int = 0) -> None:
        self.bits = bits
        self.mask = (1 << bits) - 1
        rev_j = self.mask - torch.arange(l_q, dtype=torch.int64, device=device)
        # (offset + dot) * 2^b + rev_j - offset * 2^b in wrapping int32 arithmetic: exact whenever the
        # result (dot * 2^b + rev_j) fits, which precision.int8_limit ensures.
        self.rev_j = _wrap_int32(rev_j - (int_offset << bits)).view(1, 1, -1)
        self.delta = _index_delta(r_step, l_q, self.mask, device)
        self.l_q = l_q
        self.device = device

    def start(self, k: int, l_c: int) -> None:
        self.row_key = torch.empty(k, l_c, dtype=torch.int32, device=self.device)
        self.col_key = torch.full((k, self.l_q), INT32_MIN, dtype=torch.int32, device=self.device)

    def update(self, sim: torch.Tensor, i0: int) -> None:
        r = sim.shape[1]
        key = torch.add(self.rev_j, sim, alpha=1 << self.bits, out=sim)  # dot * 2^b + (2^b - 1 - j)
        self.row_key[:, i0 : i0 + r] = key.amax(dim=2)
        key.add_(self.delta[:r])  # now dot * 2^b + (2^b - 1 - i_local)
        torch.maximum(self.col_key, key.amax(dim=1) - i0, out=self.col_key)  # i_local -> i0 + i_local

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        best_c_of_q = self.mask - (self.col_key & self.mask)
        best_q_of_c = self.mask - (self.row_key & self.mask)
        return best_c_of_q.long(), best_q_of_c.long()


class BucketFloatReducer:
    """Exact first argmaxes of float32 tiles (without negative zeros) through value reductions.

    The key is the float's bit pattern with its low b bits replaced by 2^b - 1 - index. For values
    >= 0 the bit pattern orders like the value, so the largest key lies in the bucket (same high bits)
    of the exact maximum, and among that bucket's members it is the lowest index. Every position holding
    the exact maximum is in that bucket, so when the key's position holds the exact maximum (checked
    against amax) it is the first argmax. Otherwise (a near-tie within 2^-(23-b) relative that a lower
    index loses, or a maximum below zero) that row or column is recomputed with argmax: rare, and exact.
    """

    def __init__(self, l_q: int, r_step: int, bits: int, device: torch.device) -> None:
        self.mask = (1 << bits) - 1
        self.j = torch.arange(l_q, dtype=torch.int32, device=device)
        self.delta = _index_delta(r_step, l_q, self.mask, device)
        self.l_q = l_q
        self.device = device
        self.key_buffer = torch.empty(0, dtype=torch.int32, device=device)

    def start(self, k: int, l_c: int) -> None:
        self.row_arg = torch.empty(k, l_c, dtype=torch.int64, device=self.device)
        self.col_max = torch.full((k, self.l_q), -torch.inf, dtype=torch.float32, device=self.device)
        self.col_arg = torch.zeros(k, self.l_q, dtype=torch.int64, device=self.device)

    def update(self, sim: torch.Tensor, i0: int) -> None:
        r = sim.shape[1]
        row_max, tile_col_max = sim.amax(dim=2), sim.amax(dim=1)
        key = self._key(sim)
        key.sub_(self.j)  # low bits: 2^b - 1 - j
        row_arg = self._index(key.amax(dim=2))
        _fix_rows(sim, row_arg, row_max)
        self.row_arg[:, i0 : i0 + r] = row_arg
        key.add_(self.delta[:r])  # low bits: 2^b - 1 - i_local
        col_arg = self._index(key.amax(dim=1))
        _fix_columns(sim, col_arg, tile_col_max)
        better = tile_col_max > self.col_max  # strict: an earlier tile keeps a tie
        self.col_max = torch.where(better, tile_col_max, self.col_max)
        self.col_arg = torch.where(better, col_arg + i0, self.col_arg)

    def _key(self, sim: torch.Tensor) -> torch.Tensor:
        if self.key_buffer.numel() < sim.numel():
            self.key_buffer = torch.empty(sim.numel(), dtype=torch.int32, device=self.device)
        out = self.key_buffer[: sim.numel()].view(sim.shape)
        return torch.bitwise_or(sim.view(torch.int32), self.mask, out=out)  # low bits all ones

    def _index(self, key: torch.Tensor) -> torch.Tensor:
        return (self.mask - (key & self.mask)).long()

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.col_arg, self.row_arg


def _fix_rows(sim: torch.Tensor, row_arg: torch.Tensor, row_max: torch.Tensor) -> None:
    wrong = torch.gather(sim, 2, row_arg[..., None])[..., 0] != row_max
    if wrong.any():
        row_arg[wrong] = sim[wrong].argmax(dim=-1)


def _fix_columns(sim: torch.Tensor, col_arg: torch.Tensor, col_max: torch.Tensor) -> None:
    wrong = torch.gather(sim, 1, col_arg[:, None, :])[:, 0] != col_max
    if wrong.any():
        ks, js = torch.nonzero(wrong, as_tuple=True)
        col_arg[ks, js] = sim[ks, :, js].argmax(dim=1)


class FloatReducer:
    """torch.max / argmax, which return the first maximal index: fast on GPUs."""

    def __init__(self, l_q: int, device: torch.device) -> None:
        self.l_q = l_q
        self.device = device

    def start(self, k: int, l_c: int) -> None:
        self.row_arg = torch.empty(k, l_c, dtype=torch.int64, device=self.device)
        self.col_max = torch.full((k, self.l_q), -torch.inf, dtype=torch.float32, device=self.device)
        self.col_arg = torch.zeros(k, self.l_q, dtype=torch.int64, device=self.device)

    def update(self, sim: torch.Tensor, i0: int) -> None:
        self.row_arg[:, i0 : i0 + sim.shape[1]] = sim.argmax(dim=2)
        tile_max, tile_arg = sim.max(dim=1)
        better = tile_max > self.col_max  # strict: an earlier tile keeps a tie
        self.col_max = torch.where(better, tile_max, self.col_max)
        self.col_arg = torch.where(better, tile_arg + i0, self.col_arg)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.col_arg, self.row_arg


def _index_delta(r_step: int, l_q: int, mask: int, device: torch.device) -> torch.Tensor:
    """(r_step, L_q): added to a key whose low bits are 2^b - 1 - j, it makes them 2^b - 1 - i_local."""
    rev_i = mask - torch.arange(r_step, dtype=torch.int32, device=device)
    rev_j = mask - torch.arange(l_q, dtype=torch.int32, device=device)
    return rev_i.view(-1, 1) - rev_j


def _wrap_int32(values: torch.Tensor) -> torch.Tensor:
    return ((values + 2**31) % 2**32 - 2**31).to(torch.int32)
