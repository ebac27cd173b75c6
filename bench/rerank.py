"""Benchmark: the tiled MNN engine against a direct full-tensor implementation of spec section 5.

Both run in the same process on the same maps. For K in {20, 100} and both local modes (61x61x128 and the
training-free 16x16xD) it reports median time, peak memory beyond the inputs, and how far each precision's
counts and re-ranked top-1 move from exact float32. With real images available it also measures that
on maps of ../shared/data. Prints one JSON document.

    python -m bench.rerank [--k 20,100] [--precisions float32,bfloat16,int8] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import itertools
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
from model.matching import (
    DenseMaps,
    best_matches,
    default_precision,
    mnn_scores,
    mnn_scores_detailed,
    native,
    rerank_order,
)
from model.matching.kernels import int8_route
from model.matching.precision import Precision

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


def synthetic_maps(
    k: int, side: int, channels: int, seed: int = 0, related: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """A query and K unit-norm candidate maps: three related to the query at the ranks 0, K/10 and
    K/4, the others unrelated; or all unrelated (`related=False`: a place missing from the database)."""
    gen = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(side, side, channels, generator=gen), dim=-1)
    cands = F.normalize(torch.randn(k, side, side, channels, generator=gen), dim=-1)
    for rank, noise in zip((0, k // 10, k // 4), POSITIVE_NOISE if related else (), strict=False):
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


# Three candidates related to the query (a place in the database), or none (a place missing from it).
SCENES = {"match": True, "no_match": False}


def bench_synthetic(
    ks: list[int],
    precisions: list[str],
    repeats: int,
    device: torch.device,
    modes: list[str],
    scenes: list[str],
) -> list[dict]:
    rows = []
    for mode, scene, k in itertools.product(modes, scenes, ks):
        rows += bench_case(mode, scene, k, precisions, repeats, device)
        _log(f"{mode} {scene} K={k} done")
    return rows


def bench_case(
    mode: str, scene: str, k: int, precisions: list[str], repeats: int, device: torch.device
) -> list[dict]:
    """One map size and scene: the authors' matcher and each precision, interleaved round by round."""
    side, channels = MODES[mode]
    query, cands = synthetic_maps(k, side, channels, related=SCENES[scene])
    query, cands = query.to(device), cands.to(device)
    methods = {"full_tensor": lambda: full_tensor_counts(query, cands)}
    resolved = {p: _engine_precision(p, device, query.shape) for p in precisions}
    methods |= {p: (lambda p=p: mnn_scores(query, cands, resolved[p])) for p in precisions}
    runs = measure(methods, device, repeats)
    base = {"mode": mode, "scene": scene, "K": k, "map": [side, side, channels]}
    base["inputs_mib"] = _mib(query, cands)
    reference = runs.pop("full_tensor")
    ref_ms = statistics.median(reference["times"]) * 1e3
    rows = [{**base, "method": "full_tensor", "precision": "float32", **_timing(reference)}]
    for precision, run in runs.items():
        row = {**base, "method": "engine", "precision": precision, "resolved": resolved[precision]}
        row |= _timing(run)
        row["speedup"] = ref_ms / row["median_ms"]
        row |= agreement(reference["result"], run["result"])
        if precision in ("int8+float32", "default"):
            scored = mnn_scores_detailed(query, cands, resolved[precision])
            row["recounted_in_float32"], row["top_exact"] = scored.recounted, scored.top_exact
        rows.append(row)
    return rows


def gemm_floors(device: torch.device, k: int = 100, side: int = 61, channels: int = 128) -> dict:
    """The similarity products alone, per query at K candidates, from the fastest GEMM torch offers for
    each dtype (the engine's tile kernel, torch.mm with 16-bit output, torch._int_mm with either
    operand layout) on one tile of the engine's size: the floor each precision is measured against."""
    from model.matching.engine import DEFAULT_TILE_ELEMENTS

    positions = side * side
    rows = DEFAULT_TILE_ELEMENTS.get(device.type, DEFAULT_TILE_ELEMENTS["cuda"]) // positions
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(positions, channels, generator=gen).to(device)
    tile = torch.randn(1, rows, channels, generator=gen).to(device)
    floors = {}
    for name, routes in _gemm_routes(query, tile).items():
        best = {}
        for route, fn in routes.items():
            try:
                best[route] = _best_of(fn, device)
            except (RuntimeError, NotImplementedError):  # a route this device does not have
                continue
        route = min(best, key=best.get)
        rate = 2 * rows * positions * channels / best[route]
        floors[name] = {
            "route": route,
            "gemm_gops": rate / 1e9,
            "products_s_per_query": 2 * k * positions**2 * channels / rate,
        }
    return {"K": k, "map": [side, side, channels], "tile_rows": rows, **floors}


def _gemm_routes(query: torch.Tensor, tile: torch.Tensor) -> dict[str, dict[str, Callable[[], object]]]:
    from model.matching.kernels import similarity_kernel

    q16, t16 = query.bfloat16(), tile.bfloat16()
    q8, t8 = query.to(torch.int8), tile[0].to(torch.int8)
    q8_cols = q8.contiguous().T  # (C, L) with columns contiguous: the layout oneDNN's int8 GEMM wants
    q8_rows = q8.T.contiguous()
    engine = {p: similarity_kernel(q, p) for p, q in ((Precision.FLOAT32, query), (Precision.BFLOAT16, q16))}
    engine_int8 = similarity_kernel(q8, Precision.INT8)
    return {
        "float32": {
            "engine tile": lambda: engine[Precision.FLOAT32](tile),
            "torch.mm": lambda: tile[0] @ query.T,
        },
        "bfloat16": {
            "engine tile": lambda: engine[Precision.BFLOAT16](t16),
            "torch.mm": lambda: t16[0] @ q16.T,
        },
        "int8": {
            "engine tile": lambda: engine_int8(t8[None]),
            "torch._int_mm": lambda: torch._int_mm(t8, q8_rows),
            "torch._int_mm, column-major": lambda: torch._int_mm(t8, q8_cols),
        },
    }


def fused_check(device: torch.device, k: int = 16) -> list[dict]:
    """The fused kernel (model/matching/fused.py) against the engine's tiles on the same maps: both
    argmaxes equal, per precision; and whether the fused kernel ran at all."""
    import os

    from model.matching.engine import best_matches
    from model.matching.fused import fused_enabled
    from model.matching.maps import DenseMaps
    from model.matching.precision import Precision

    query, cands = synthetic_maps(k, 61, 128)
    query, cands = query.flatten(0, 1).to(device), DenseMaps(cands.to(device))
    rows, before = [], os.environ.get("SELAVPR_FUSED_MNN")
    try:
        for name in ("bfloat16", "float16", "int8"):
            precision = Precision(name)
            os.environ["SELAVPR_FUSED_MNN"] = "1"
            used = fused_enabled(device, precision)
            got = best_matches(query, cands, precision, device, None)
            os.environ["SELAVPR_FUSED_MNN"] = "0"
            want = best_matches(query, cands, precision, device, None)
            rows.append(
                {
                    "precision": name,
                    "fused_ran": used,
                    "best_c_of_q_equal": float((got.best_c_of_q == want.best_c_of_q).float().mean()),
                    "best_q_of_c_equal": float((got.best_q_of_c == want.best_q_of_c).float().mean()),
                    "counts_fused": got.mutual().sum(dim=1).tolist()[:4],
                    "counts_tiles": want.mutual().sum(dim=1).tolist()[:4],
                }
            )
    finally:
        if before is None:
            os.environ.pop("SELAVPR_FUSED_MNN", None)
        else:
            os.environ["SELAVPR_FUSED_MNN"] = before
    return rows


# (BM, BN, warps) tried by --fused-sweep
FUSED_CONFIGS = ((64, 64, 4), (128, 64, 4), (128, 64, 8), (64, 128, 4), (128, 128, 8), (256, 64, 8))


def fused_sweep(device: torch.device, k: int = 100) -> list[dict]:
    """The fused kernel's time per query at K candidates for each block shape, per precision."""
    from model.matching.fused import fused_best_matches
    from model.matching.precision import index_bits
    from model.matching.quantize import quantize_int8

    query, cands = synthetic_maps(k, 61, 128)
    query, cands = query.flatten(0, 1).to(device), cands.flatten(1, 2).to(device)
    bits = index_bits(query.shape[0], cands.shape[1])
    operands = {
        "bfloat16": (query.bfloat16(), cands.bfloat16()),
        "int8": (quantize_int8(query[None], bits)[0], quantize_int8(cands, bits)),
    }
    rows = []
    for name, (q, c) in operands.items():
        for bm, bn, warps in FUSED_CONFIGS:
            try:
                seconds = _best_of(
                    lambda q=q, c=c, bm=bm, bn=bn, w=warps: fused_best_matches(q, c, bm, bn, w), device
                )
                rows.append({"precision": name, "BM": bm, "BN": bn, "warps": warps, "ms": seconds * 1e3})
            except Exception as exc:  # a shape the compiler refuses is a result too
                rows.append({"precision": name, "BM": bm, "BN": bn, "warps": warps, "error": repr(exc)[:200]})
    return rows


def _best_of(fn: Callable[[], object], device: torch.device, rounds: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _engine_precision(name: str, device: torch.device, map_shape: tuple[int, ...]) -> str:
    """ "default" is what mnn_scores picks with precision=None on this device for maps of this shape."""
    return str(default_precision(device, map_shape)) if name == "default" else name


def _timing(run: dict) -> dict:
    return {
        "median_ms": statistics.median(run["times"]) * 1e3,
        "min_ms": min(run["times"]) * 1e3,
        "peak_extra_mib": run["peak_extra_mib"],
    }


def real_maps(shared: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Local maps of the shared images from the default backbone: the training-free patch tokens, and a
    61x61x128 map from a seeded, untrained local head (the only one available offline); one forward each.
    Also each image's place (the triplets' pK folder; the Tokyo pair is one place)."""
    from model.config import LocalMode
    from model.preprocess import Preprocessing

    triplets = sorted((shared / "matching_triplets").glob("p*/i*/*.jpg"))
    paths = triplets + sorted((shared / "tokyo_pair").glob("*"))
    places = [p.parent.parent.name for p in triplets] + ["tokyo"] * (len(paths) - len(triplets))
    model = untrained_head_model(device).model
    prep = Preprocessing()
    tokens, head = [], []
    with torch.inference_mode():
        for path in paths:
            patch_map = model.patch_map(prep.load(path)[None].to(device))
            tokens.append(model.local_features(patch_map, LocalMode.PATCH_TOKENS)[0])
            head.append(model.local_features(patch_map, LocalMode.LOCAL_HEAD)[0])
    maps = {"patch_tokens": torch.stack(tokens), "local_head (untrained head)": torch.stack(head)}
    return maps, places


def bench_real(
    shared: Path, precisions: list[str], device: torch.device, scenes: list[str], query_count: int | None
) -> list[dict]:
    """Each image (or `query_count` of them, evenly spread) a query against the others ("match": its
    place's other views among them) or against the other places only ("no_match"): agreement with
    float32 and the total time over all queries."""
    rows = []
    all_maps, places = real_maps(shared, device)
    n = len(places)
    picked = sorted({round(i * n / query_count) for i in range(query_count)}) if query_count else range(n)
    for (mode, maps), scene in itertools.product(all_maps.items(), scenes):
        queries = []
        for i in picked:
            keep = [j for j in range(maps.shape[0]) if j != i and (SCENES[scene] or places[j] != places[i])]
            queries.append((maps[i], maps[keep]))
        exact = [mnn_scores(q, c, "float32") for q, c in queries]
        for p in precisions:
            resolved = _engine_precision(p, device, maps.shape[1:])
            rows.append({"mode": mode, "scene": scene, "queries": len(queries), "precision": p})
            rows[-1] |= {"resolved": resolved} | _real_precision(queries, exact, resolved)
        _log(f"real {mode} {scene} done")
    return rows


def _real_precision(queries: list, exact: list[torch.Tensor], precision: str) -> dict:
    start = time.perf_counter()
    scored = [mnn_scores_detailed(q, c, precision) for q, c in queries]
    seconds = time.perf_counter() - start
    checks = [agreement(e, s.counts) for e, s in zip(exact, scored, strict=True)]
    return {
        "candidates_per_query": [min(len(c) for _, c in queries), max(len(c) for _, c in queries)],
        "total_s": seconds,
        "top1_unchanged": sum(c["top1_same"] for c in checks) / len(checks),
        "top_exact_reported": sum(s.top_exact for s in scored) / len(scored),
        "recounted_mean": float(np.mean([s.recounted for s in scored])),
        "counts_identical": float(np.mean([c["counts_identical"] for c in checks])),
        "max_abs_diff": max(c["max_abs_diff"] for c in checks),
        "max_rel_diff": max(c["max_rel_diff"] for c in checks),
    }


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
        "--precisions",
        default="float32,bfloat16,int8,int8+float32,default",
        help="engine precisions to time; default: what precision=None picks on the device",
    )
    parser.add_argument("--modes", default=",".join(MODES), help="local map sizes (default: %(default)s)")
    parser.add_argument("--scenes", default=",".join(SCENES), help="candidate sets (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case, median reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--shared-data", type=Path, default=DEFAULT_SHARED, help="real images (skipped if absent)"
    )
    parser.add_argument("--real-queries", type=int, help="real maps: this many queries (default: all 32)")
    parser.add_argument("--floors-only", action="store_true", help="only the GEMM floors")
    parser.add_argument("--no-real", dest="real", action="store_false", help="synthetic maps only")
    parser.add_argument("--fused-check", action="store_true", help="fused kernel against tiles first")
    parser.add_argument("--fused-sweep", action="store_true", help="fused kernel block shapes, timed")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    precisions = [p for p in args.precisions.split(",") if p]
    report = {"machine": machine(device)}
    report["default_precision"] = {
        "x".join(map(str, s)): str(default_precision(device, s)) for s in SPEEDUP_SHAPES
    }
    report["int8_route"] = int8_route(device)
    report["native_kernels"] = native_kernels(device)
    report["floors"] = gemm_floors(device)
    if args.fused_check:
        report["fused_check"] = fused_check(device)
    if args.fused_sweep:
        report["fused_sweep"] = fused_sweep(device)
    if args.floors_only:
        emit(report, args.out)
        return report
    report["synthetic"] = bench_synthetic(
        [int(k) for k in args.k.split(",")],
        precisions,
        args.repeats,
        device,
        _names(args.modes, MODES),
        _names(args.scenes, SCENES),
    )
    if args.real and (args.shared_data / "matching_triplets").is_dir():
        scenes = _names(args.scenes, SCENES)
        report["real"] = bench_real(args.shared_data, precisions, device, scenes, args.real_queries)
    emit(report, args.out)
    return report


SPEEDUP_SHAPES = [(61, 61, 128), (16, 16, 384), (16, 16, 1024)]
NATIVE_PRECISIONS = (Precision.FLOAT32, Precision.INT8, Precision.BFLOAT16)


def native_kernels(device: torch.device) -> dict:
    """Which C kernels (model/matching/native.py) the engine runs here, out of its dispatch table, and
    int8's speed-up over float32."""
    kernels = {str(p): native.native_enabled(device, p) for p in NATIVE_PRECISIONS}
    kernels["runs"] = {str(p): k.name if (k := native.kernel_for(p)) else None for p in NATIVE_PRECISIONS}
    kernels["isa_cap"] = native._isa_cap()  # SELAVPR_NATIVE_ISA
    kernels["dispatch"] = native.dispatch_table()
    if device.type != "cpu":
        return kernels
    kernels["int8_speedup"] = {  # what defaults.NATIVE_INT8_MIN_PRODUCTS was set from
        "x".join(map(str, shape)): round(int8_speedup(shape), 2) for shape in SPEEDUP_SHAPES
    }
    return kernels


def int8_speedup(map_shape: tuple[int, int, int]) -> float:
    """float32 time over int8 time of the engine (quantization included) on one query against a few
    candidates: two at 61x61x128, more for smaller maps (up to 32, about the same products), so that
    per-call costs weigh as they do in a re-ranking. Best of three."""
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    h, w, channels = map_shape
    k = min(32, max(2, round(2 * (61 * 61) ** 2 * 128 / ((h * w) ** 2 * channels))))
    query = F.normalize(torch.randn(h * w, channels, generator=gen), dim=-1)
    cands = DenseMaps(F.normalize(torch.randn(k, h, w, channels, generator=gen), dim=-1))
    seconds = {
        p: _best_of(lambda p=p: best_matches(query, cands, p, cpu, None), cpu, rounds=3)
        for p in (Precision.FLOAT32, Precision.INT8)
    }
    return seconds[Precision.FLOAT32] / seconds[Precision.INT8]


def _names(text: str, known: dict) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {unknown}; expected some of {list(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
