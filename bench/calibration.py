"""Benchmark: the calibrated probability on the shared images (docs/benchmarks.md, "Knowing when the
answer is wrong").

Three query sets from matching_triplets (each view i0, i1, i2 in turn the queries, the other two views
the database; `bench.shared_dataset`), and with --perturbed-variants N three more: N query-like variants
of each of those query photos (`bench.perturbed_queries`, in a temporary directory) against the same
database. For each: the database index is built (self-calibrated), then `selavpr eval --place-removed`:
AUC-PR and recall at 100% precision of the top-1 answers ranked by the probability, today's confidence
and the global score; the probability's ECE over 10 bins; each with its 95% bootstrap interval (variants
of one photo resampled together), the ECE a perfectly calibrated predictor would show, and the share
rejected with the true places removed. The sets of each kind are also pooled. Also: what self-calibration
adds to a build of all 32 shared images (built once without, once with), and what computing the
probability costs per /localize. One JSON document; --raw writes the per-query answers and the
self-calibration samples that `bench.calibration_choice` refits.

    python -m bench.calibration [--out FILE] [--perturbed-variants 10] [--raw FILE] [--rerank-k 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import DEFAULT_SHARED, emit, machine
from bench.perturbed_queries import make_perturbed_dataset, photo_group
from bench.shared_dataset import make_dataset
from index_builder.builder import BuildConfig, build_index
from index_builder.evaluate import EvalConfig, TopAnswers, answer_quality, evaluate
from index_builder.search import Localizer, answer_probability
from index_builder.self_calibration import (
    CANDIDATES,
    MAX_SAMPLES,
    SelfCalibrationConfig,
    held_out_answers,
)
from index_builder.store import IndexVersion
from model.datasets import VPRSplit
from model.extractor import FeatureExtractor, resolve_device
from model.matching.defaults import resolve_precision
from tests.helpers import shared_references

VIEWS = ("i0", "i1", "i2")
KINDS = ("real", "perturbed")


def query_sets(
    extractor: FeatureExtractor,
    shared: Path,
    work: Path,
    rerank_k: int,
    calibration: SelfCalibrationConfig,
    variants: int = 0,
) -> tuple[dict, dict]:
    """(the sets' figures, per set the raw answers: features, labels, photos and the database's
    self-calibration answers). For each view: the real photos as queries, then (variants > 0) their
    perturbed variants (bench.perturbed_queries) against the same database index."""
    sets, raw = {}, {}
    for view in VIEWS:
        root = make_dataset(work / f"queries-{view}", shared, query_view=view)
        index_dir = root / "index"
        datasets = [("real", root, None)]
        if variants:
            perturbed_root = make_perturbed_dataset(work / f"perturbed-{view}", shared, view, variants)
            datasets.append(("perturbed", perturbed_root, photo_group))
        for kind, dataset, group in datasets:
            config = EvalConfig(
                dataset=dataset,
                rerank_k=rerank_k,
                index_dir=index_dir,
                place_removed=True,
                calibration=calibration,
                query_group=group,
            )
            report = evaluate(config, extractor, show_progress=False)
            name = f"{kind} {view}"
            sets[name] = {
                "queries": report.queries,
                "photos": len({photo_group(q) for q in VPRSplit.load(dataset, "test").queries_paths}),
                "database": report.database,
                "recall_at_1": {
                    "global": report.global_recalls["1"],
                    "reranked": report.reranked_recalls["1"],
                },
                "calibration": report.calibration,
                "answers": {stage: _summary(quality) for stage, quality in report.answers.items()},
                "reliability": {
                    stage: quality.get("reliability") for stage, quality in report.answers.items()
                },
                "place_removed": report.place_removed,
            }
            paths = VPRSplit.load(dataset, "test").queries_paths
            raw[name] = _raw(report.top_answers, paths)
            raw[name]["place_removed"] = _raw(report.top_answers_place_removed, paths)
        raw[f"self-calibration {view}"] = self_calibration_answers(index_dir, calibration)
    return sets, raw


def _summary(quality: dict) -> dict:
    keep = ("auc_pr", "auc_pr_interval", "recall_at_100_precision")
    out = {key[3:]: {k: q[k] for k in keep} for key, q in quality.items() if key.startswith("by_")}
    extra = ("ece", "ece_interval", "ece_if_calibrated", "probability_versus")
    return out | {k: quality[k] for k in extra if k in quality}


def _raw(answers: TopAnswers, paths: list[Path]) -> dict:
    """Per query: right or wrong, the scores and the calibration's features, and its photo."""
    return {
        "photo": [photo_group(p) for p in paths],
        "right": answers.right,
        "probability": answers.probability,
        "global_score": answers.global_score,
        "confidence": answers.confidence,
        "features": {
            stage: [None if x is None else x.tolist() for x in rows]
            for stage, rows in answers.feature_rows.items()
        },
    }


def self_calibration_answers(index_dir: Path, config: SelfCalibrationConfig) -> list:
    """The database's self-calibration sample again (the same seed, so the same held-out references):
    (stage, features, right, leave-one-out?) rows, for fitting alternatives offline."""
    version = IndexVersion.open_current(index_dir)
    try:
        records = version.all_records()
        global_desc = version.index.reconstruct_n(0, len(records))
        precision = str(resolve_precision(None, torch.device("cpu"), version.identity.local_shape))

        def read(ids):
            return torch.from_numpy(version.read_local(list(ids)))

        answers, _ = held_out_answers(records, global_desc, read, precision, config)
    finally:
        version.close()
    return [[stage, x.tolist(), right, normal] for stage, x, right, normal in answers]


def pooled(raw: dict) -> dict:
    """Each kind's sets (real views, perturbed variants) as one: the figures with their intervals
    (variants of one photo resampled together)."""
    out = {}
    for kind in KINDS:
        names = [name for name in raw if name.startswith(kind)]
        if not names:
            continue
        joined, groups = TopAnswers(), []
        for name in names:
            for stage in ("global", "reranked"):
                joined.right[stage] += raw[name]["right"][stage]
                joined.probability[stage] += list(raw[name]["probability"][stage])
                joined.global_score[stage] += raw[name]["global_score"][stage]
            joined.confidence += raw[name]["confidence"]
            groups += raw[name]["photo"]
        n = len(joined.confidence)
        quality = answer_quality(joined, np.ones(n, dtype=bool), calibrated=True, groups=groups)
        out[kind] = {"queries": n, "photos": len(set(groups))}
        out[kind] |= {stage: _summary(q) for stage, q in quality.items()}
    return out


def build_cost(
    extractor: FeatureExtractor,
    shared: Path,
    work: Path,
    calibration: SelfCalibrationConfig,
    repeats: int = 3,
) -> dict:
    """All 32 shared images (the triplets located by place), built from scratch without and with
    self-calibration, alternately `repeats` times (the cores may be shared: medians of interleaved runs)."""
    refs = shared_references(shared, work / "refs")
    seconds: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}  # CPU time of this process: steadier when shared
    calibration_s, encode_s = [], []
    for run in range(repeats):
        for calibrate in (False, True):
            index_dir = work / f"index-{calibrate}-{run}"
            config = BuildConfig(refs, index_dir, calibrate=calibrate, calibration=calibration)
            started, started_cpu = time.perf_counter(), time.process_time()
            report = build_index(config, extractor)
            seconds[calibrate].append(time.perf_counter() - started)
            cpu[calibrate].append(time.process_time() - started_cpu)
            if calibrate:
                calibration_s.append(report.calibration_seconds)
                encode_s.append(report.encode_seconds)
    plain = statistics.median(seconds[False])
    return {
        "images": report.total,
        "repeats": repeats,
        "build_without_calibration_s": round(plain, 2),
        "build_with_calibration_s": round(statistics.median(seconds[True]), 2),
        "encode_s": round(statistics.median(encode_s), 2),
        "calibration_s": round(statistics.median(calibration_s), 3),
        "calibration_share_of_build": round(statistics.median(calibration_s) / plain, 3),
        "cpu_without_calibration_s": round(statistics.median(cpu[False]), 2),
        "cpu_with_calibration_s": round(statistics.median(cpu[True]), 2),
        "cpu_share": round(statistics.median(cpu[True]) / statistics.median(cpu[False]) - 1, 3),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "index_dir": str(work / f"index-True-{repeats - 1}"),
    }


def localize_cost(index_dir: Path, shared: Path, extractor: FeatureExtractor, repeats: int = 200) -> dict:
    """The probability's own time per answer (features + model, from the search's arrays) against a
    whole localization of a shared photo."""
    localizer = Localizer(Localizer.open(index_dir, device=str(extractor.device)).index, extractor)
    query = next((shared / "matching_triplets" / "p2" / "i2").iterdir())
    totals = [localizer.localize(query, str(query)).timings_ms.total for _ in range(5)]
    version = localizer.index
    rng = np.random.default_rng(0)
    k = min(100, len(version))
    ids = rng.choice(len(version), size=k, replace=False)
    scores, counts = np.sort(rng.random(k))[::-1], rng.integers(0, 200, size=k)
    started = time.perf_counter()
    for _ in range(repeats):
        answer_probability(version, scores, ids, counts, 256)
    per_answer_ms = (time.perf_counter() - started) / repeats * 1e3
    total_ms = statistics.median(totals)
    return {
        "candidates": k,
        "probability_ms": round(per_answer_ms, 4),
        "localize_total_ms": round(total_ms, 1),
        "share": round(per_answer_ms / total_ms, 5),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.calibration", description=__doc__.split("\n")[0])
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--rerank-k", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--samples", type=int, default=MAX_SAMPLES, help="self-calibration's held-out references"
    )
    parser.add_argument("--candidates", type=int, default=CANDIDATES, help="... and candidates each")
    parser.add_argument(
        "--perturbed-variants",
        type=int,
        default=0,
        help="also this many query-like variants of each query photo as queries (bench.perturbed_queries)",
    )
    parser.add_argument("--raw", type=Path, help="write per-query features and labels (JSON) here")
    parser.add_argument("--skip-build", action="store_true", help="leave out the build-cost measurement")
    parser.add_argument("--skip-sets", action="store_true", help="leave out the query sets")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    extractor = FeatureExtractor.from_checkpoint("default", device=str(device))
    work = Path(tempfile.mkdtemp(prefix="bench-calibration-"))
    calibration = SelfCalibrationConfig(max_samples=args.samples, candidates=args.candidates)
    build, cost = {}, {}
    try:
        sets, raw = (
            ({}, {})
            if args.skip_sets
            else query_sets(
                extractor, args.shared_data, work, args.rerank_k, calibration, args.perturbed_variants
            )
        )
        if args.raw:
            args.raw.write_text(json.dumps(raw) + "\n")
        if not args.skip_build:
            build = build_cost(extractor, args.shared_data, work / "build", calibration)
            cost = localize_cost(Path(build.pop("index_dir")), args.shared_data, extractor)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "machine": machine(device),
        "checkpoint": extractor.info.description,
        "rerank_k": args.rerank_k,
        "self_calibration": {"max_samples": args.samples, "candidates": args.candidates},
        "perturbed_variants": args.perturbed_variants,
        "sets": sets,
        "pooled": pooled(raw) if raw else {},
        "build": build,
        "localize": cost,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
