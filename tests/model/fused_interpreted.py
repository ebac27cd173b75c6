"""Run by tests/model/test_fused.py in a child process with TRITON_INTERPRET=1 (Triton reads it when it
is first imported): the fused kernel on CPU tensors against the engine's exact matching of the same
operands, ties included. Prints one line per precision and channel count and exits non-zero on any
difference."""

import os
import sys

import torch
import torch.nn.functional as F

import model.matching.fused as fused
from model.matching.engine import best_matches
from model.matching.maps import DenseMaps
from model.matching.precision import Precision


def maps_with_ties(channels: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    query = F.normalize(torch.randn(9, 9, channels, generator=gen), dim=-1)
    cands = F.normalize(torch.randn(5, 9, 9, channels, generator=gen), dim=-1)
    cands[1] = F.normalize(query + 0.3 * cands[1], dim=-1)  # a true match: many mutual pairs
    cands[2, 0, 1] = cands[2, 0, 0]  # equal candidate positions: ties over candidate positions
    query[3, 4] = query[3, 3]  # equal query positions: ties over query positions
    cands[4, 8, 8] = query[3, 3]  # and a candidate position that is one of them
    return query, cands


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    cpu, failed = torch.device("cpu"), False
    for channels in (32, 24):  # 24: zero-padded to 32 inside (ViT-S patch tokens have 384)
        failed |= compare(*maps_with_ties(channels), cpu)
    return 1 if failed else 0


def compare(query: torch.Tensor, cands: torch.Tensor, cpu: torch.device) -> bool:
    failed = False
    for precision in (Precision.FLOAT16, Precision.INT8):  # the interpreter has no bfloat16
        os.environ["SELAVPR_FUSED_MNN"] = "1"
        used = fused.fused_enabled(cpu, precision)
        got = best_matches(query.flatten(0, 1), DenseMaps(cands), precision, cpu, None)
        os.environ["SELAVPR_FUSED_MNN"] = "0"
        want = reference(query, cands, precision, cpu)
        same = torch.equal(got.best_c_of_q, want.best_c_of_q) and torch.equal(
            got.best_q_of_c, want.best_q_of_c
        )
        counts = got.mutual().sum(dim=1).tolist()
        print(f"{precision} C={query.shape[-1]} fused={used} same={same} counts={counts}")
        failed |= not (used and same and counts[1] == max(counts))
    return failed


def reference(query: torch.Tensor, cands: torch.Tensor, precision: Precision, cpu: torch.device):
    """What the kernel computes: int8 as the tiles do (exact integers); float16 operands with float32
    similarities (the tiles round similarities to 16 bits too; the kernel keeps them in float32), i.e.
    exact float32 matching of the float16-rounded maps."""
    if precision is Precision.INT8:
        return best_matches(query.flatten(0, 1), DenseMaps(cands), precision, cpu, None)
    rounded_q, rounded_c = query.half().float().flatten(0, 1), cands.half().float()
    return best_matches(rounded_q, DenseMaps(rounded_c), Precision.FLOAT32, cpu, None)


if __name__ == "__main__":
    sys.exit(main())
