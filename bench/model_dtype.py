"""Benchmark: the model forward per dtype (float32, bfloat16, float16 through autocast).

- forward: images/s of the whole SelaVPR forward (global descriptor and local maps) at batch 1 (latency)
  and the given batch sizes, per dtype, the dtypes interleaved round by round. The default weights, or a
  randomly initialised ViT of another size (`--vit vitl14`: the paper's ViT-L/14).
- deviation (default weights, the shared images): cosine of the reduced-dtype descriptors to float32's,
  MNN count deviation (exact float32 counts on both), and whether the re-ranked top-1 stays.
- recall: `selavpr eval` Recall@N on the shared images laid out as a benchmark (bench.shared_dataset),
  global and re-ranked, per dtype.

    python -m bench.model_dtype [--parts forward,deviation,recall] [--dtypes float32,bfloat16]
        [--vit default|vits14|vitb14|vitl14] [--batches 1,8] [--device cpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import DEFAULT_SHARED, emit, machine
from model.config import LocalMode, SelaVPRConfig, vit_config
from model.dtype import ModelDtype, autocast, cpu_has_native_bfloat16
from model.matching import mnn_scores, rerank_order
from model.options import ModelOptions

PARTS = ("forward", "deviation", "recall")


def log(message: str) -> None:
    print(f"[bench model_dtype] {message}", file=sys.stderr, flush=True)


def bench_model(vit: str, device: torch.device):
    """The default weights, or a random-weight SelaVPR of the given ViT size (speed only)."""
    if vit == "default":
        from model.weights.loading import load_model

        return load_model("default", device).model.eval()
    from model.selavpr import SelaVPR

    return SelaVPR(SelaVPRConfig(vit_config(vit))).to(device).eval()


def bench_forward(
    vit: str, dtypes: list[ModelDtype], batches: list[int], rounds: int, device: torch.device
) -> list[dict]:
    model = bench_model(vit, device)
    rows = []
    for batch in batches:
        images = torch.randn(batch, 3, 224, 224, device=device)
        times = {d: [] for d in dtypes}
        for _ in range(rounds + 1):  # the first round warms up (oneDNN primitives, cuDNN autotune)
            for dtype in dtypes:
                times[dtype].append(_timed_forward(model, images, dtype, device))
        for dtype in dtypes:
            seconds = statistics.median(times[dtype][1:])
            rows.append(
                {
                    "vit": vit,
                    "batch": batch,
                    "model_dtype": str(dtype),
                    "median_ms": seconds * 1e3,
                    "images_per_s": batch / seconds,
                    "vs_float32": statistics.median(times[ModelDtype.FLOAT32][1:]) / seconds
                    if ModelDtype.FLOAT32 in times
                    else None,
                }
            )
        log(f"forward {vit} batch {batch} done")
    return rows


@torch.inference_mode()
def _timed_forward(model, images: torch.Tensor, dtype: ModelDtype, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    with autocast(dtype, device):
        model(images, LocalMode.LOCAL_HEAD)
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_deviation(shared: Path, dtypes: list[ModelDtype], device: torch.device) -> list[dict]:
    """Each shared image a query against the other 31, descriptors from each dtype's forward."""
    from model.extractor import FeatureExtractor

    triplets = sorted((shared / "matching_triplets").glob("p*/i*/*.jpg"))
    paths = triplets + sorted((shared / "tokyo_pair").glob("*"))
    places = [p.parent.parent.name for p in triplets] + ["tokyo"] * (len(paths) - len(triplets))
    embedded = {}
    for dtype in dtypes:
        extractor = FeatureExtractor.from_checkpoint("default", str(device), model_dtype=dtype)
        embedded[dtype] = extractor.embed(paths)
    exact = embedded[ModelDtype.FLOAT32]
    exact_counts = _all_counts(torch.from_numpy(exact.local))
    rows = []
    for dtype in dtypes:
        ours = embedded[dtype]
        counts = exact_counts if dtype is ModelDtype.FLOAT32 else _all_counts(torch.from_numpy(ours.local))
        diffs = [(c - e).abs() for c, e in zip(counts, exact_counts, strict=True)]
        rows.append(
            {
                "model_dtype": str(dtype),
                "local_mode": str(ours.local_mode),
                "images": len(paths),
                "global_cosine_min": _min_cosine(ours.global_desc, exact.global_desc),
                "local_cosine_min": _min_cosine(
                    ours.local.reshape(-1, ours.local.shape[-1]),
                    exact.local.reshape(-1, exact.local.shape[-1]),
                ),
                "counts_identical": float(np.mean([float((d == 0).float().mean()) for d in diffs])),
                "count_max_abs_diff": int(max(int(d.max()) for d in diffs)),
                "count_max_rel_diff": max(
                    float((d / e.clamp(min=1)).max()) for d, e in zip(diffs, exact_counts, strict=True)
                ),
                **_top1_changes(counts, exact_counts, places),
            }
        )
    return rows


def _top1_changes(counts: list[torch.Tensor], exact: list[torch.Tensor], places: list[str]) -> dict:
    """How often the best-counted candidate moves, by how much float32 had it ahead of the new one
    (a flip of a near-tie is noise; one of a clear winner is damage), and how often the best candidate's
    place is right in float32 and in this dtype."""
    n = len(places)
    others = [[j for j in range(n) if j != i] for i in range(n)]
    top, top_exact = [int(rerank_order(c)[0]) for c in counts], [int(rerank_order(e)[0]) for e in exact]
    margins = [int(exact[i][top_exact[i]] - exact[i][top[i]]) for i in range(n) if top[i] != top_exact[i]]
    right = [places[others[i][top[i]]] == places[i] for i in range(n)]
    right_exact = [places[others[i][top_exact[i]]] == places[i] for i in range(n)]
    return {
        "rerank_top1_unchanged": float(np.mean([t == e for t, e in zip(top, top_exact, strict=True)])),
        "changed_top1_float32_margins": margins,
        "top1_right_place": int(sum(right)),
        "top1_right_place_float32": int(sum(right_exact)),
    }


def _all_counts(maps: torch.Tensor) -> list[torch.Tensor]:
    return [mnn_scores(maps[i], torch.cat([maps[:i], maps[i + 1 :]]), "float32") for i in range(len(maps))]


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(F.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b), dim=-1).min())


def bench_recall(shared: Path, dtypes: list[ModelDtype], device: torch.device) -> list[dict]:
    from bench.shared_dataset import make_dataset
    from index_builder.evaluate import EvalConfig, evaluate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dataset = make_dataset(Path(tmp) / "dataset", shared)
        for dtype in dtypes:
            config = EvalConfig(
                dataset=dataset,
                rerank_k=20,
                recalls=(1, 5),
                index_dir=Path(tmp) / f"index-{dtype}",
                model=ModelOptions(device=str(device), model_dtype=str(dtype)),
            )
            report = evaluate(config, show_progress=False)
            rows.append(
                {
                    "model_dtype": str(dtype),
                    "global": report.global_recalls,
                    "reranked": report.reranked_recalls,
                }
            )
            log(f"recall {dtype} done")
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.model_dtype", description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--dtypes", default="float32,bfloat16", help="model dtypes (float32 always runs)")
    parser.add_argument("--vit", default="default", help="default weights, or vits14/vitb14/vitl14 random")
    parser.add_argument("--batches", default="1,8", help="forward batch sizes")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per case, median reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtypes = [ModelDtype.FLOAT32] + [ModelDtype(d) for d in args.dtypes.split(",") if d and d != "float32"]
    parts = [p for p in args.parts.split(",") if p]
    report: dict = {"machine": machine(device), "cpu_native_bfloat16": cpu_has_native_bfloat16()}
    if "forward" in parts:
        batches = [int(b) for b in args.batches.split(",")]
        report["forward"] = bench_forward(args.vit, dtypes, batches, args.rounds, device)
    if "deviation" in parts:
        report["deviation"] = bench_deviation(args.shared_data, dtypes, device)
    if "recall" in parts:
        report["recall"] = bench_recall(args.shared_data, dtypes, device)
    emit(report, args.out)
    return report


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
