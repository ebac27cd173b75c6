"""Query image -> ranked reference images and an estimated location: global top-K retrieval, then MNN
re-ranking of the K candidates' local features read from the store a few at a time."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from index_builder.calibration import CandidateView
from index_builder.errors import CheckpointMismatch
from index_builder.results import (
    DEFAULT_RERANK_K,
    DEFAULT_TOP_K,
    EstimatedLocation,
    LocalizeResult,
    Match,
    Timings,
)
from index_builder.shard_search import (
    Candidates,
    CountFn,
    RerankCounts,
    merge,
    rerank_counts,
    searchers_of,
    shards_to_search,
)
from index_builder.sharding import LocationPrior, shard_key
from index_builder.store import ImageRecord, IndexVersion
from model.extractor import FeatureExtractor, resolve_device
from model.matching import native, rerank_order
from model.matching.defaults import resolve_precision
from model.options import ModelOptions
from model.preprocess import ImageSource, MemoryBudget
from model.weights.loading import load_model

log = logging.getLogger(__name__)


@dataclass
class Query:
    """A decoded, preprocessed query image, what decoding it cost, and its (width, height) as oriented."""

    tensor: torch.Tensor
    decode_s: float
    size: tuple[int, int] | None = None


def prepare_query(
    extractor: FeatureExtractor,
    source: ImageSource,
    name: str | None = None,
    budget: MemoryBudget | None = None,
) -> Query:
    """Decode and preprocess one query image (CPU work, no model): ImageDecodeError if it cannot."""
    start = time.perf_counter()
    tensor, size = extractor.preprocessing.load_sized(source, name, budget)
    return Query(tensor, time.perf_counter() - start, size)


class Localizer:
    def __init__(
        self,
        index: IndexVersion,
        extractor: FeatureExtractor,
        precision: str | None = None,
        resident_max_bytes: int = 0,
    ) -> None:
        """`resident_max_bytes`: on an accelerator, hold the index's local maps in its memory when they
        take at most this much (re-ranking then reads nothing per query)."""
        check_compatible(index, extractor)
        self.index, self.extractor, self.precision = index, extractor, precision
        self.mode = resolve_precision(precision, extractor.device, index.identity.local_shape)
        engine = native.describe() if extractor.device.type == "cpu" else str(extractor.device)
        log.info("index %s: re-ranking %s maps in %s (%s)", index.name, _shape(index), self.mode, engine)
        self.searchers = searchers_of(index)
        if index.calibration is not None:
            _ = index.locations  # read now, not by the first query
        hold_maps_resident(index, extractor.device, resident_max_bytes)

    @classmethod
    def open(
        cls, index_dir: str | os.PathLike, checkpoint: str | None = None, device: str | None = None
    ) -> Localizer:
        index = IndexVersion.open_current(index_dir)
        return cls(index, extractor_for(index, checkpoint, device))

    def prepare(self, source: ImageSource, name: str | None = None) -> Query:
        return prepare_query(self.extractor, source, name)

    def run(
        self,
        queries: Sequence[Query],
        top_k: Sequence[int] | int = DEFAULT_TOP_K,
        rerank_k: Sequence[int] | int = DEFAULT_RERANK_K,
        priors: Sequence[LocationPrior | None] | None = None,
    ) -> list[LocalizeResult]:
        """Prepared queries -> results: one model forward for all, one global search per location shard,
        then each query's merge and re-ranking. top_k, rerank_k and the location prior may differ per
        query."""
        start = time.perf_counter()
        global_desc, local = self.extractor.extract_tensors(torch.stack([q.tensor for q in queries]))
        extract_s = time.perf_counter() - start
        results = self.search(global_desc, local, top_k, rerank_k, priors)
        for query, result in zip(queries, results, strict=True):
            timings = result.timings_ms.model_dump() | {
                "decode": query.decode_s * 1e3,
                "extract": extract_s * 1e3,
            }
            timings["total"] = timings["decode"] + timings["extract"] + timings["search"] + timings["rerank"]
            result.timings_ms = Timings(**{k: round(v, 2) for k, v in timings.items()})
        return results

    def search(
        self,
        global_desc: torch.Tensor,
        local: torch.Tensor,
        top_k: Sequence[int] | int = DEFAULT_TOP_K,
        rerank_k: Sequence[int] | int = DEFAULT_RERANK_K,
        priors: Sequence[LocationPrior | None] | None = None,
    ) -> list[LocalizeResult]:
        """Extracted features of queries (global (Q, D), local (Q, h, w, C)) -> results."""
        n = len(global_desc)
        top_ks = [top_k] * n if isinstance(top_k, int) else list(top_k)
        rerank_ks = [rerank_k] * n if isinstance(rerank_k, int) else list(rerank_k)
        priors = list(priors) if priors is not None else [None] * n
        # the local maps stay where the model ran: re-ranking runs there too (on a GPU, ~100x faster)
        global_desc, local = global_desc.float().cpu().numpy(), local.float()
        start = time.perf_counter()
        targets = [shards_to_search(self.index, prior) for prior in priors]
        depth = max(max(rerank_ks), max(top_ks))
        tops = {k: self.searchers[k].top(global_desc, depth) for k in sorted(set().union(*targets))}
        search_s = time.perf_counter() - start
        results = []
        for i in range(n):
            rerank_start = time.perf_counter()
            candidates = merge([tops[k][i] for k in targets[i]], max(rerank_ks[i], top_ks[i]))
            counted = rerank_counts(candidates, self._count_locally(local[i]), self.mode)
            result = answer(self.index, local[i], candidates, counted, top_ks[i], targets[i])
            rerank_s = time.perf_counter() - rerank_start
            result.timings_ms = Timings(
                search=round(search_s * 1e3, 2),
                rerank=round(rerank_s * 1e3, 2),
                total=round((search_s + rerank_s) * 1e3, 2),
            )
            results.append(result)
        return results

    def candidate_views(self, queries: Sequence[Query], rerank_k: int) -> list[CandidateView]:
        """What the answers' probabilities are computed from, for fitting a calibration: each query's
        re-ranked candidates (every shard, no prior) with their scores, counts and locations."""
        global_desc, local = self.extractor.extract_tensors(torch.stack([q.tensor for q in queries]))
        global_np, local = global_desc.float().cpu().numpy(), local.float()
        everything = shards_to_search(self.index, None)
        tops = {k: self.searchers[k].top(global_np, rerank_k) for k in everything}
        views = []
        for i in range(len(queries)):
            candidates = merge([tops[k][i] for k in everything], rerank_k)
            counted = rerank_counts(candidates, self._count_locally(local[i]), self.mode)
            answered = counted.counts >= 0
            positions = local[i].shape[0] * local[i].shape[1]
            ids, scores = candidates.ids[answered], candidates.scores[answered]
            views.append(self.index.locations.view(ids, scores, counted.counts[answered], positions))
        return views

    def localize(
        self,
        source: ImageSource,
        name: str | None = None,
        top_k: int = DEFAULT_TOP_K,
        rerank_k: int = DEFAULT_RERANK_K,
        prior: LocationPrior | None = None,
    ) -> LocalizeResult:
        return self.run([self.prepare(source, name)], top_k, rerank_k, [prior])[0]

    def _count_locally(self, query_local: torch.Tensor) -> CountFn:
        def count(ids_by_shard, mode):
            return {k: self.searchers[k].counts(query_local, ids, mode) for k, ids in ids_by_shard.items()}

        return count


def answer(
    version: IndexVersion,
    query_local: torch.Tensor,
    candidates: Candidates,
    counted: RerankCounts,
    top_k: int,
    searched: Sequence[int],
) -> LocalizeResult:
    """Merged candidates and their counts -> the answer: ordered by MNN count (equal counts keep the
    global order), the top_k described. Candidates whose shard did not answer are left out, and the
    answer says which shards those were and what share of the searched references it covers."""
    answered = counted.counts >= 0
    scores, ids, counts = candidates.scores[answered], candidates.ids[answered], counted.counts[answered]
    order = rerank_order(counts)[:top_k]
    records = version.records(ids[order].tolist())
    matches = [
        _match(record, rank, float(scores[i]), int(counts[i]))
        for rank, (i, record) in enumerate(zip(order, records, strict=True), start=1)
    ]
    positions = query_local.shape[0] * query_local.shape[1]
    location = estimate_location(matches, positions)
    probability = answer_probability(version, scores, ids, counts, positions) if location else None
    sizes = shard_sizes(version)
    total = sum(sizes[k] for k in searched)
    covered = sum(sizes[k] for k in searched if k not in counted.missing)
    return LocalizeResult(
        matches=matches,
        location=location,
        index_version=version.name,
        status="located" if location else "no_location",
        probability=probability,
        radius_m=version.calibration.radius_m if version.calibration else None,
        calibration=version.calibration.id if version.calibration else None,
        partial=bool(counted.missing),
        missing_shards=[shard_key(k) for k in sorted(counted.missing)],
        coverage=round(covered / total, 6) if total else 1.0,
    )


def answer_probability(
    version: IndexVersion, scores: np.ndarray, ids: np.ndarray, counts: np.ndarray, positions: int
) -> float | None:
    """The version's calibrated probability of the re-ranked answer (None: uncalibrated). Only arrays
    the search already holds and the in-memory locations: microseconds per query."""
    if version.calibration is None:
        return None
    view = version.locations.view(ids, scores, np.asarray(counts), positions)
    probability = version.calibration.probability(view, "reranked")
    return None if probability is None else round(probability, 4)


def shard_sizes(version: IndexVersion) -> list[int]:
    """References per location shard (an unsharded version: one shard of all)."""
    return [s.count for s in version.manifest.location_shards] or [len(version)]


def _shape(index: IndexVersion) -> str:
    return "x".join(map(str, index.identity.local_shape))


def hold_maps_resident(
    index: IndexVersion, device: torch.device, max_bytes: int, ids: np.ndarray | None = None
) -> bool:
    """The GPU policy of a server (the single process, and a Ray shard replica for its own references,
    `ids`): on an accelerator, hold the local maps in its memory when they take at most max_bytes, so
    that re-ranking reads nothing per query. Whether they are held."""
    count = len(index) if ids is None else len(ids)
    if device.type == "cpu" or not 0 < index.stored_local_bytes(count) <= max_bytes:
        return False
    return make_resident(index, device, ids)


def make_resident(index: IndexVersion, device: torch.device, ids: np.ndarray | None = None) -> bool:
    start = time.perf_counter()
    try:
        index.make_resident(device, ids)
    except torch.OutOfMemoryError:
        log.warning("index %s: its local maps do not fit on %s; reading them per query", index.name, device)
        return False
    count = len(index) if ids is None else len(ids)
    mib = index.stored_local_bytes(count) / 2**20
    log.info(
        "index %s: %.0f MiB of local maps on %s (%.1f s)",
        index.name,
        mib,
        device,
        time.perf_counter() - start,
    )
    return True


def _match(record: ImageRecord, rank: int, score: float, count: int) -> Match:
    return Match(
        id=record.id,
        name=record.display_name,
        path=record.path,
        rank=rank,
        global_score=round(score, 6),
        mnn_matches=count,
        lat=record.lat,
        lon=record.lon,
        utm_east=record.utm_east,
        utm_north=record.utm_north,
    )


def estimate_location(matches: Sequence[Match], query_positions: int) -> EstimatedLocation | None:
    """The best-ranked match that has latitude and longitude. Confidence: the share of the query's local
    positions with a mutual match in that image (a different scale per local mode: compare like with
    like)."""
    for match in matches:
        if match.lat is not None and match.lon is not None:
            confidence = min(1.0, match.mnn_matches / max(query_positions, 1))
            return EstimatedLocation(
                lat=match.lat, lon=match.lon, source_id=match.id, confidence=round(confidence, 4)
            )
    return None


def extractor_for(
    index: IndexVersion, checkpoint: str | None = None, device: str | None = None
) -> FeatureExtractor:
    """The model the index was built with (from its manifest unless given), set up exactly as then."""
    identity = index.identity
    recorded = index.manifest.checkpoint
    source = checkpoint or recorded.spec or recorded.source
    recorded_options = ModelOptions(
        image_size=identity.image_size,
        local_mode=identity.local_mode,
        feature_block=identity.feature_block,
        model_dtype=identity.model_dtype,
        exif_transpose=identity.exif_transpose,
    )
    return FeatureExtractor.with_options(load_model(source, resolve_device(device)), recorded_options)


def check_compatible(index: IndexVersion, extractor: FeatureExtractor) -> None:
    """The extractor computes features the way the index's were (model, local mode, block, size, dtype)."""
    identity = index.identity
    got = (
        extractor.info.fingerprint,
        str(extractor.local_mode),
        extractor.feature_block,
        extractor.preprocessing.image_size[0],
        str(extractor.model_dtype),
    )
    want = (
        identity.fingerprint,
        identity.local_mode,
        identity.feature_block,
        identity.image_size,
        identity.model_dtype,
    )
    if got != want:
        raise CheckpointMismatch(
            f"index {index.name} was built with checkpoint {want[0]} "
            f"({index.manifest.checkpoint.description}), local mode {want[1]}, "
            f"feature block {want[2]}, image size {want[3]}, model dtype {want[4]}; this model is {got[0]}, "
            f"{got[1]}, feature block {got[2]}, {got[3]}, {got[4]}. "
            "Use those settings, or rebuild the index."
        )
