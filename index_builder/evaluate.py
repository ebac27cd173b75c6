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
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from index_builder.builder import BuildConfig, build_index
from index_builder.global_index import search as global_search
from index_builder.search import check_compatible, prepare_query
from index_builder.store import DEFAULT_GRACE_SECONDS, DEFAULT_LOCAL_DTYPE, IndexVersion
from model.config import FeatureBlock
from model.datasets import VPRSplit
from model.extractor import FeatureExtractor, resolve_device
from model.matching import mnn_scores, rerank_order
from model.weights.cache import cache_dir
from model.weights.loading import load_model

log = logging.getLogger(__name__)

DEFAULT_RECALLS = (1, 5, 10, 20)


@dataclass
class EvalConfig:
    dataset: Path
    split: str = "test"
    checkpoint: str = "default"
    device: str | None = None
    feature_block: FeatureBlock | None = None  # None: the checkpoint's default
    rerank_k: int = 100
    recalls: Sequence[int] = DEFAULT_RECALLS
    threshold_m: float = 25.0
    queries_list: Path | None = None
    index_dir: Path | None = None  # None: a cache directory per dataset split
    batch_size: int = 16
    precision: str | None = "float32"  # exact MNN counts on the stored features
    local_dtype: str = DEFAULT_LOCAL_DTYPE
    model_dtype: str = "float32"
    grace_seconds: float = DEFAULT_GRACE_SECONDS  # for the cached database index's superseded versions


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

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("global_recalls", "reranked_recalls")}
        return {**out, "global": self.global_recalls, "reranked": self.reranked_recalls}


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
    extractor = extractor or FeatureExtractor.from_checkpoint(
        config.checkpoint,
        config.device,
        feature_block=config.feature_block,
        model_dtype=config.model_dtype,
    )
    index_dir = config.index_dir or default_eval_index_dir(split)
    build_index(
        BuildConfig(
            references=split.database_dir,
            index_dir=index_dir,
            batch_size=config.batch_size,
            local_dtype=config.local_dtype,
            grace_seconds=config.grace_seconds,
        ),
        extractor=extractor,
    )
    timings["encode_database"] = time.perf_counter() - started
    version = IndexVersion.open_current(index_dir)
    try:
        check_compatible(version, extractor)
        order = _database_order(version, split)
        predictions_global, predictions_reranked = _predict(config, split, version, extractor, show_progress)
    finally:
        version.close()
    timings["queries"] = time.perf_counter() - started - timings["encode_database"]
    positives = split.positives(config.threshold_m)
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
    )


def evaluate_feature_blocks(
    config: EvalConfig, blocks: Sequence[FeatureBlock], show_progress: bool = True
) -> list[EvalReport]:
    """One evaluation per feature block with the model loaded once. Each block's database index lives in
    its own sub-directory (`feature-block-N`), so a repeated sweep re-encodes nothing."""
    split = VPRSplit.load(config.dataset, config.split, config.queries_list)
    root = config.index_dir or default_eval_index_dir(split)
    loaded = load_model(config.checkpoint, resolve_device(config.device))
    reports = []
    for block in blocks:
        extractor = FeatureExtractor(loaded, feature_block=block)
        block_config = replace(config, feature_block=block, index_dir=root / f"feature-block-{block}")
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
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    depth = max(config.rerank_k, max(config.recalls))
    global_predictions, reranked_predictions = [], []
    bar = tqdm(total=len(split.queries_paths), desc="queries", unit="img", disable=not show_progress or None)
    for start in range(0, len(split.queries_paths), config.batch_size):
        paths = split.queries_paths[start : start + config.batch_size]
        batch = torch.stack([prepare_query(extractor, p, str(p)).tensor for p in paths])
        global_desc, local = extractor.extract_tensors(batch)
        _, ids = global_search(version.index, global_desc.float().cpu().numpy(), depth)
        for q in range(len(paths)):
            candidates = ids[q][ids[q] >= 0]
            head = candidates[: config.rerank_k]
            query_local = local[q].float()  # re-ranked where the model ran (a GPU when there is one)
            cands = version.candidate_maps(head.tolist(), query_local.device)
            counts = mnn_scores(query_local, cands, config.precision, device=query_local.device)
            global_predictions.append(candidates)
            reranked_predictions.append(np.concatenate([head[rerank_order(counts)], candidates[len(head) :]]))
        bar.update(len(paths))
    bar.close()
    return global_predictions, reranked_predictions


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
