"""Benchmark: the tiled MNN engine against a direct full-tensor implementation of spec section 5.

Both run in the same process on the same maps. For K in {20, 100} and both local modes (61x61x128 and the
training-free 16x16xD) it reports median time, peak memory beyond the inputs, and how far each precision's
counts and re-ranked top-1 move from exact float32. With real images available it also measures that
on maps of ../shared/data. Prints one JSON document.

    python -m bench.rerank [--k 20,100] [--precisions float32,bfloat16,int8] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import DEFAULT_SHARED, emit, machine, untrained_head_model
from bench.memory import PeakMemory
from model.matching import mnn_scores, rerank_order
from model.matching.mnn import refine_candidates

# (name, map side, channels): the local head at 224 px, and ViT-S patch tokens at 224 px.
MODES = {"local_head": (61, 128), "patch_tokens": (16, 384)}


def full_tensor_counts(query: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """The authors' way: the whole (K, L, L) float32 similarity tensor, two argmaxes, the mutual check."""
    q = query.reshape(-1, query.shape[-1])
    c = cands.reshape(cands.shape[0], -1, cands.shape[-1])
    sim = torch.matmul(c, q.T)
    best_c_of_q = sim.argmax(dim=1)
    best_q_of_c = sim.argmax(dim=2)
    del sim
    back = torch.gather(best_q_of_c, 1, best_c_of_q)
    return (back == torch.arange(q.shape[0], device=q.device)).sum(dim=1).cpu()


# Noise added to the query to make the "same place" candidates: MNN counts at 61x61x128 come out near
# 3300, 2700 and 2300 against about 1850 for unrelated candidates; one clear best, as re-ranking sees.
POSITIVE_NOISE = (2.2, 2.6, 3.0)


def synthetic_maps(k: int, side: int, channels: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A query and K unit-norm candidate maps: three related to the query at the ranks 0, K/10 and
    K/4, the others unrelated."""
    gen = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(side, side, channels, generator=gen), dim=-1)
    cands = F.normalize(torch.randn(k, side, side, channels, generator=gen), dim=-1)
    for rank, noise in zip((0, k // 10, k // 4), POSITIVE_NOISE, strict=True):
        cands[rank] = F.normalize(query + noise * cands[rank], dim=-1)
    return query, cands


def measure(
    methods: dict[str, Callable[[], torch.Tensor]], device: torch.device, repeats: int
) -> dict[str, dict]:
    """Each method's result, peak memory (first, cold call) and times. The timed runs are interleaved,
    one round over all methods at a time, so that a slow phase of a shared machine hits all alike."""
    out: dict[str, dict] = {}
    for name, fn in methods.items():
        with PeakMemory(device) as peak:
            result = fn()
        out[name] = {"result": result, "peak_extra_mib": peak.extra_mib, "times": []}
    for _ in range(repeats):
        for name, fn in methods.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            out[name]["times"].append(time.perf_counter() - start)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agreement(exact: torch.Tensor, approx: torch.Tensor) -> dict:
    diff = (approx - exact).abs()
    return {
        "counts_identical": float((diff == 0).float().mean()),
        "max_abs_diff": int(diff.max()) if diff.numel() else 0,
        "max_rel_diff": float((diff / exact.clamp(min=1)).max()) if diff.numel() else 0.0,
        "top1_same": bool(rerank_order(approx)[0] == rerank_order(exact)[0]),
    }


def bench_synthetic(ks: list[int], precisions: list[str], repeats: int, device: torch.device) -> list[dict]:
    rows = []
    for mode, (side, channels) in MODES.items():
        for k in ks:
            query, cands = synthetic_maps(k, side, channels)
            query, cands = query.to(device), cands.to(device)
            methods = {"full_tensor": lambda q=query, c=cands: full_tensor_counts(q, c)}
            methods |= {p: (lambda q=query, c=cands, p=p: mnn_scores(q, c, p)) for p in precisions}
            runs = measure(methods, device, repeats)
            base = {"mode": mode, "K": k, "map": [side, side, channels], "inputs_mib": _mib(query, cands)}
            reference = runs.pop("full_tensor")
            ref_ms = statistics.median(reference["times"]) * 1e3
            rows.append({**base, "method": "full_tensor", "precision": "float32", **_timing(reference)})
            for precision, run in runs.items():
                row = {**base, "method": "engine", "precision": precision, **_timing(run)}
                row["speedup"] = ref_ms / row["median_ms"]
                row |= agreement(reference["result"], run["result"])
                if precision == "int8+float32":
                    row["recounted_in_float32"] = len(refine_candidates(mnn_scores(query, cands, "int8")))
                rows.append(row)
            _log(f"{mode} K={k} done")
    return rows


def _timing(run: dict) -> dict:
    return {
        "median_ms": statistics.median(run["times"]) * 1e3,
        "min_ms": min(run["times"]) * 1e3,
        "peak_extra_mib": run["peak_extra_mib"],
    }


def real_maps(shared: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Local maps of the shared images from the default backbone: the training-free patch tokens, and a
    61x61x128 map from a seeded, untrained local head (the only one available offline); one forward each."""
    from model.config import LocalMode
    from model.preprocess import Preprocessing

    paths = sorted((shared / "matching_triplets").glob("p*/i*/*.jpg")) + sorted(
        (shared / "tokyo_pair").glob("*")
    )
    model = untrained_head_model(device).model
    prep = Preprocessing()
    tokens, head = [], []
    with torch.inference_mode():
        for path in paths:
            patch_map = model.patch_map(prep.load(path)[None].to(device))
            tokens.append(model.local_features(patch_map, LocalMode.PATCH_TOKENS)[0])
            head.append(model.local_features(patch_map, LocalMode.LOCAL_HEAD)[0])
    return {"patch_tokens": torch.stack(tokens), "local_head (untrained head)": torch.stack(head)}


def bench_real(shared: Path, precisions: list[str], device: torch.device) -> list[dict]:
    rows = []
    for mode, maps in real_maps(shared, device).items():
        n = maps.shape[0]
        exact_all, per_precision = [], {p: [] for p in precisions}
        for i in range(n):
            others = torch.cat([maps[:i], maps[i + 1 :]])
            exact_all.append(mnn_scores(maps[i], others, "float32"))
            for p in precisions:
                per_precision[p].append(exact_all[-1] if p == "float32" else mnn_scores(maps[i], others, p))
        for p in precisions:
            checks = [agreement(e, a) for e, a in zip(exact_all, per_precision[p], strict=True)]
            rows.append(
                {
                    "mode": mode,
                    "queries": n,
                    "candidates_per_query": n - 1,
                    "precision": p,
                    "top1_unchanged": sum(c["top1_same"] for c in checks) / n,
                    "counts_identical": float(np.mean([c["counts_identical"] for c in checks])),
                    "max_abs_diff": max(c["max_abs_diff"] for c in checks),
                    "max_rel_diff": max(c["max_rel_diff"] for c in checks),
                }
            )
    return rows


def _mib(*tensors: torch.Tensor) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _log(message: str) -> None:
    print(f"[bench rerank] {message}", file=sys.stderr, flush=True)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="python -m bench.rerank", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--k", default="20,100", help="candidate counts (default: %(default)s)")
    parser.add_argument(
        "--precisions", default="float32,bfloat16,int8,int8+float32", help="engine precisions to time"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case, median reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--shared-data", type=Path, default=DEFAULT_SHARED, help="real images (skipped if absent)"
    )
    parser.add_argument("--no-real", dest="real", action="store_false", help="synthetic maps only")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    precisions = [p for p in args.precisions.split(",") if p]
    report = {"machine": machine(device)}
    report["synthetic"] = bench_synthetic(
        [int(k) for k in args.k.split(",")], precisions, args.repeats, device
    )
    if args.real and (args.shared_data / "matching_triplets").is_dir():
        report["real"] = bench_real(args.shared_data, precisions, device)
    emit(report, args.out)
    return report


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
