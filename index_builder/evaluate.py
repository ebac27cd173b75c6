"""Recall@N on a benchmark split, global and after MNN re-ranking, the way spec section 7 defines it.

The database is encoded through the index store (incrementally, into a cache directory), so neither
building nor querying holds every local map in memory; queries are encoded in batches and only their
predictions are kept.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from index_builder.builder import BuildConfig, build_index
from index_builder.calibration import (
    DEFAULT_RADIUS_M,
    STAGES,
    Calibration,
    CandidateView,
    answer_index,
    average_precision,
    bootstrap_interval,
    bootstrap_samples,
    ece_if_calibrated,
    expected_calibration_error,
    features,
    precision_recall,
    reliability,
    threshold_for_precision,
)
from index_builder.global_index import search as global_search
from index_builder.search import check_compatible, prepare_query
from index_builder.self_calibration import SelfCalibrationConfig
from index_builder.store import DEFAULT_GRACE_SECONDS, DEFAULT_LOCAL_DTYPE, IndexVersion
from model.config import FeatureBlock
from model.datasets import VPRSplit
from model.extractor import FeatureExtractor, resolve_device
from model.matching import mnn_scores, rerank_order
from model.options import ModelOptions
from model.weights.cache import cache_dir
from model.weights.loading import load_model

log = logging.getLogger(__name__)

DEFAULT_RECALLS = (1, 5, 10, 20)


@dataclass
class EvalConfig:
    dataset: Path
    split: str = "test"
    model: ModelOptions = field(default_factory=ModelOptions)
    rerank_k: int = 100
    recalls: Sequence[int] = DEFAULT_RECALLS
    threshold_m: float = 25.0
    queries_list: Path | None = None
    index_dir: Path | None = None  # None: a cache directory per dataset split
    batch_size: int = 16
    precision: str | None = "float32"  # exact MNN counts on the stored features
    local_dtype: str = DEFAULT_LOCAL_DTYPE
    grace_seconds: float = DEFAULT_GRACE_SECONDS  # for the cached database index's superseded versions
    place_removed: bool = False  # also answer every query with its true places left out of the database
    calibration: SelfCalibrationConfig = field(default_factory=SelfCalibrationConfig)  # the database's
    # query path -> its group for the bootstrap (queries of one group are resampled together); None:
    # every query its own
    query_group: Callable[[Path], str] | None = None


@dataclass
class EvalReport:
    dataset: str
    split: str
    queries: int
    database: int
    queries_without_positives: int
    threshold_m: float
    rerank_k: int
    checkpoint: dict[str, str]
    local_mode: str
    feature_block: FeatureBlock
    global_recalls: dict[str, float]
    reranked_recalls: dict[str, float]
    timings_s: dict[str, float] = field(default_factory=dict)
    # calibration.summary() of the database index; None: uncalibrated (no probability to evaluate)
    calibration: dict[str, Any] | None = None
    answers: dict[str, Any] = field(default_factory=dict)  # answer_quality(): per stage, PR and ECE
    place_removed: dict[str, Any] | None = None  # place_removed_quality()
    # per query, normal and with the true places removed (for pooling sets); not in to_dict()
    top_answers: TopAnswers | None = None
    top_answers_place_removed: TopAnswers | None = None

    def to_dict(self) -> dict[str, Any]:
        dropped = ("global_recalls", "reranked_recalls", "top_answers", "top_answers_place_removed")
        out = {k: v for k, v in self.__dict__.items() if k not in dropped}
        return {**out, "global": self.global_recalls, "reranked": self.reranked_recalls}


@dataclass
class TopAnswers:
    """Per query, the top-1 answer of each stage: right or wrong, and the numbers it could be ranked by."""

    right: dict[str, list[bool]] = field(default_factory=lambda: {s: [] for s in STAGES})
    probability: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    global_score: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    confidence: list[float] = field(default_factory=list)  # the re-ranked answer's (search.py's)
    # the calibration's features of each answer (None: nothing located), to compare other fits offline
    feature_rows: dict[str, list[np.ndarray | None]] = field(default_factory=lambda: {s: [] for s in STAGES})

    def add(self, view: CandidateView, calibration: Calibration | None, right: np.ndarray) -> None:
        """`right`: per candidate of `view`, whether it is a true match of the query."""
        radius_m = calibration.radius_m if calibration else DEFAULT_RADIUS_M
        for stage in STAGES:
            self.feature_rows[stage].append(features(view, stage, radius_m))
            top = answer_index(view, stage)
            self.right[stage].append(top is not None and bool(right[top]))
            self.global_score[stage].append(float(view.scores[top]) if top is not None else -1.0)
            p = calibration.probability(view, stage) if calibration and top is not None else None
            self.probability[stage].append(0.0 if p is None else p)
        top = answer_index(view, "reranked")
        assert view.counts is not None
        share = float(view.counts[top]) / max(view.positions, 1) if top is not None else 0.0
        self.confidence.append(min(1.0, share))


def answer_quality(
    answers: TopAnswers, has_positive: np.ndarray, calibrated: bool, groups: Sequence[Any] | None = None
) -> dict[str, Any]:
    """VPR-Bench style, per stage: precision-recall of the top-1 answers ranked by each score (AUC-PR,
    recall at 100% precision, the curve), and for the probability its ECE and reliability table. With
    each figure, how uncertain it is at this sample size: a 95% bootstrap interval over the queries
    (`groups`: queries resampled together, e.g. variants of one photo); for the ECE also what a perfectly
    calibrated predictor would show (ece_if_calibrated); for the probability, its AUC-PR minus each other
    score's on the same resamples (paired, so the queries' shared difficulty cancels)."""
    has_positive = np.asarray(has_positive, dtype=bool)
    out: dict[str, Any] = {}
    for stage in STAGES:
        right = np.array(answers.right[stage], dtype=bool)
        by = {"global_score": np.array(answers.global_score[stage])}
        if stage == "reranked":
            by["confidence"] = np.array(answers.confidence)
        if calibrated:
            by["probability"] = np.array(answers.probability[stage])
        out[stage] = {}
        for name, score in by.items():
            quality = precision_recall(score, right, int(has_positive.sum()))
            quality["auc_pr_interval"] = _auc_interval(score, right, has_positive, groups)
            out[stage][f"by_{name}"] = quality
        if calibrated:
            p = by["probability"]
            out[stage]["ece"] = round(expected_calibration_error(p, right), 4)
            out[stage]["ece_interval"] = bootstrap_interval(
                lambda i, p=p, right=right: expected_calibration_error(p[i], right[i]), len(p), groups
            )
            out[stage]["ece_if_calibrated"] = ece_if_calibrated(p)
            out[stage]["reliability"] = reliability(p, right)
            out[stage]["probability_versus"] = {
                name: _auc_difference(by["probability"], score, right, has_positive, groups)
                for name, score in by.items()
                if name != "probability"
            }
    return out


def _auc_interval(
    score: np.ndarray, right: np.ndarray, has_positive: np.ndarray, groups: Sequence[Any] | None
) -> list[float]:
    def auc(i: np.ndarray) -> float:
        return average_precision(score[i], right[i], int(has_positive[i].sum()))

    return bootstrap_interval(auc, len(score), groups)


def _auc_difference(
    probability: np.ndarray,
    other: np.ndarray,
    right: np.ndarray,
    has_positive: np.ndarray,
    groups: Sequence[Any] | None,
) -> dict[str, Any]:
    """AUC-PR by probability minus by `other`, its paired 95% bootstrap interval, and the share of
    resamples where the probability ranks strictly better."""

    def difference(i: np.ndarray) -> float:
        relevant = int(has_positive[i].sum())
        return average_precision(probability[i], right[i], relevant) - average_precision(
            other[i], right[i], relevant
        )

    draws = np.array([difference(i) for i in bootstrap_samples(len(right), groups)])
    return {
        "difference": round(difference(np.arange(len(right))), 4),
        "interval": [round(float(np.quantile(draws, q)), 4) + 0.0 for q in (0.025, 0.975)],
        "share_better": round(float(np.mean(draws > 0)), 4),
    }


def place_removed_quality(normal: TopAnswers, removed: TopAnswers, precision: float = 0.95) -> dict[str, Any]:
    """With the true places left out every answer is wrong: the share rejected (probability below the
    threshold that gives `precision` on the normal run), per stage."""
    out: dict[str, Any] = {"target_precision": precision}
    for stage in STAGES:
        p = np.array(normal.probability[stage])
        threshold = threshold_for_precision(p, np.array(normal.right[stage]), precision)
        removed_p = np.array(removed.probability[stage])
        rejected = float(np.mean(removed_p < threshold)) if threshold is not None and len(removed_p) else None
        out[stage] = {
            "threshold": threshold,
            "rejected": None if rejected is None else round(rejected, 4),
            "wrong_anyway": int(len(removed_p) - sum(removed.right[stage])),
            "queries": len(removed_p),
        }
    return out


def recall_at(
    predictions: Sequence[Sequence[int]], positives: Sequence[np.ndarray], ns: Sequence[int]
) -> dict[str, float]:
    """Percent of queries with at least one positive among their first N predictions; a query without
    positives counts as a miss."""
    hits = np.zeros(len(ns))
    for predicted, positive in zip(predictions, positives, strict=True):
        if len(positive) == 0:
            continue
        found = np.isin(np.asarray(predicted), positive)
        for i, n in enumerate(ns):
            hits[i] += bool(found[:n].any())
    total = max(len(predictions), 1)
    return {str(n): round(100.0 * float(h) / total, 4) for n, h in zip(ns, hits, strict=True)}


def default_eval_index_dir(split: VPRSplit) -> Path:
    key = hashlib.sha256(f"{split.root.resolve()}|{split.split}".encode()).hexdigest()[:16]
    return cache_dir() / "eval" / f"{split.root.name}-{split.split}-{key}"


def evaluate(
    config: EvalConfig, extractor: FeatureExtractor | None = None, show_progress: bool = True
) -> EvalReport:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    split = VPRSplit.load(config.dataset, config.split, config.queries_list)
    extractor = extractor or FeatureExtractor.from_options(config.model)
    index_dir = config.index_dir or default_eval_index_dir(split)
    build_index(
        BuildConfig(
            references=split.database_dir,
            index_dir=index_dir,
            batch_size=config.batch_size,
            local_dtype=config.local_dtype,
            grace_seconds=config.grace_seconds,
            calibration=config.calibration,
        ),
        extractor=extractor,
    )
    timings["encode_database"] = time.perf_counter() - started
    version = IndexVersion.open_current(index_dir)
    positives = split.positives(config.threshold_m)
    try:
        check_compatible(version, extractor)
        order = _database_order(version, split)
        calibration = version.calibration
        predicted = _predict(config, split, version, extractor, show_progress, order, positives)
        predictions_global, predictions_reranked, normal, removed = predicted
    finally:
        version.close()
    timings["queries"] = time.perf_counter() - started - timings["encode_database"]
    has_positive = np.array([len(p) > 0 for p in positives], dtype=bool)
    groups = [config.query_group(p) for p in split.queries_paths] if config.query_group else None
    ns = sorted(config.recalls)
    as_dataset = [order[p] for p in predictions_global], [order[p] for p in predictions_reranked]
    return EvalReport(
        dataset=str(config.dataset),
        split=config.split,
        queries=len(split.queries_paths),
        database=len(split.database_paths),
        queries_without_positives=sum(1 for p in positives if len(p) == 0),
        threshold_m=config.threshold_m,
        rerank_k=config.rerank_k,
        checkpoint={"description": extractor.info.description, "fingerprint": extractor.info.fingerprint},
        local_mode=str(extractor.local_mode),
        feature_block=extractor.feature_block,
        global_recalls=recall_at(as_dataset[0], positives, ns),
        reranked_recalls=recall_at(as_dataset[1], positives, ns),
        timings_s={k: round(v, 2) for k, v in timings.items()},
        calibration=calibration.summary() if calibration else None,
        answers=answer_quality(normal, has_positive, calibration is not None, groups),
        place_removed=place_removed_quality(normal, removed) if removed and calibration else None,
        top_answers=normal,
        top_answers_place_removed=removed,
    )


def evaluate_feature_blocks(
    config: EvalConfig, blocks: Sequence[FeatureBlock], show_progress: bool = True
) -> list[EvalReport]:
    """One evaluation per feature block with the model loaded once. Each block's database index lives in
    its own sub-directory (`feature-block-N`), so a repeated sweep re-encodes nothing."""
    split = VPRSplit.load(config.dataset, config.split, config.queries_list)
    root = config.index_dir or default_eval_index_dir(split)
    loaded = load_model(config.model.checkpoint, resolve_device(config.model.device))
    reports = []
    for block in blocks:
        options = replace(config.model, feature_block=block)
        extractor = FeatureExtractor.with_options(loaded, options)
        block_config = replace(config, model=options, index_dir=root / f"feature-block-{block}")
        log.info("feature block %s", block)
        reports.append(evaluate(block_config, extractor, show_progress))
    return reports


def _database_order(version: IndexVersion, split: VPRSplit) -> np.ndarray:
    """Index id -> position in the split's sorted database list (the index stores relative paths)."""
    position = {p.relative_to(split.database_dir).as_posix(): i for i, p in enumerate(split.database_paths)}
    records = version.all_records()
    missing = [r.path for r in records if r.path not in position]
    if missing or len(records) != len(split.database_paths):
        log.warning(
            "index and database differ (%d indexed, %d listed)", len(records), len(split.database_paths)
        )
    return np.array([position.get(r.path, -1) for r in records], dtype=np.int64)


def _predict(
    config: EvalConfig,
    split: VPRSplit,
    version: IndexVersion,
    extractor: FeatureExtractor,
    show_progress: bool,
    order: np.ndarray,
    positives: Sequence[np.ndarray],
) -> tuple[list[np.ndarray], list[np.ndarray], TopAnswers, TopAnswers | None]:
    """Predictions of both stages, and each query's top-1 answers (normal, and with its true places
    left out of the database when config.place_removed). The extra depth lets the place-removed run
    re-rank as many candidates as the normal one."""
    extra = max((len(p) for p in positives), default=0) if config.place_removed else 0
    depth = max(config.rerank_k, max(config.recalls)) + extra
    global_predictions, reranked_predictions = [], []
    normal, removed = TopAnswers(), TopAnswers() if config.place_removed else None
    calibration = version.calibration
    bar = tqdm(total=len(split.queries_paths), desc="queries", unit="img", disable=not show_progress or None)
    for start in range(0, len(split.queries_paths), config.batch_size):
        paths = split.queries_paths[start : start + config.batch_size]
        batch = torch.stack([prepare_query(extractor, p, str(p)).tensor for p in paths])
        global_desc, local = extractor.extract_tensors(batch)
        scores, ids = global_search(version.index, global_desc.float().cpu().numpy(), depth)
        for q in range(len(paths)):
            found = ids[q] >= 0
            candidates, candidate_scores = ids[q][found], scores[q][found]
            true_place = np.isin(order[candidates], positives[start + q])
            counted = candidates[: config.rerank_k + extra]
            query_local = local[q].float()  # re-ranked where the model ran (a GPU when there is one)
            cands = version.candidate_maps(counted.tolist(), query_local.device)
            counts = mnn_scores(query_local, cands, config.precision, device=query_local.device).numpy()
            positions = query_local.shape[0] * query_local.shape[1]
            head = np.arange(min(config.rerank_k, len(candidates)))
            tail = candidates[len(head) : depth - extra]
            global_predictions.append(candidates[: depth - extra])
            reranked_predictions.append(np.concatenate([candidates[head][rerank_order(counts[head])], tail]))
            view = version.locations.view(candidates[head], candidate_scores[head], counts[head], positions)
            normal.add(view, calibration, true_place[head])
            if removed is not None:  # the same query against the database without its true places
                keep = np.nonzero(~true_place[: len(counted)])[0][: config.rerank_k]
                kept = candidates[keep], candidate_scores[keep], counts[keep]
                removed.add(version.locations.view(*kept, positions), calibration, true_place[keep])
        bar.update(len(paths))
    bar.close()
    return global_predictions, reranked_predictions, normal, removed


def plot_recalls(report: EvalReport, path: Path) -> None:
    """Recall@N curves of both stages, drawn with Pillow (no plotting dependency)."""
    from PIL import Image, ImageDraw

    width, height, margin = 640, 420, 56
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    ns = sorted(int(n) for n in report.global_recalls)
    low = min(min(report.global_recalls.values()), min(report.reranked_recalls.values()))
    floor = max(0.0, 10 * math.floor(low / 10) - 10)

    def point(i: int, value: float) -> tuple[float, float]:
        x = margin + (width - 2 * margin) * (i / max(len(ns) - 1, 1))
        y = height - margin - (height - 2 * margin) * (value - floor) / (100 - floor)
        return x, y

    draw.line([(margin, margin), (margin, height - margin), (width - margin, height - margin)], fill="black")
    for tick in range(int(floor), 101, 10):
        _, y = point(0, tick)
        draw.line([(margin - 4, y), (margin, y)], fill="black")
        draw.text((8, y - 6), f"{tick}", fill="black")
    for i, n in enumerate(ns):
        x, _ = point(i, floor)
        draw.text((x - 8, height - margin + 8), f"R@{n}", fill="black")
    for label, recalls, colour, row in (
        ("global", report.global_recalls, (70, 110, 220), 0),
        ("re-ranked", report.reranked_recalls, (220, 80, 60), 1),
    ):
        points = [point(i, recalls[str(n)]) for i, n in enumerate(ns)]
        draw.line(points, fill=colour, width=3)
        for x, y in points:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        draw.text((width - margin - 120, margin + 16 * row), f"- {label}", fill=colour)
    draw.text((margin, 16), f"{Path(report.dataset).name} {report.split}: Recall@N (%)", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
