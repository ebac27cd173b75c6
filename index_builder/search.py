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

from index_builder.errors import CheckpointMismatch
from index_builder.global_index import search as global_search
from index_builder.results import (
    DEFAULT_RERANK_K,
    DEFAULT_TOP_K,
    EstimatedLocation,
    LocalizeResult,
    Match,
    Timings,
)
from index_builder.store import ImageRecord, IndexVersion
from model.extractor import FeatureExtractor, resolve_device
from model.loading import load_model
from model.matching import mnn_scores, rerank_order
from model.preprocess import ImageSource, MemoryBudget

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
        if extractor.device.type != "cpu" and 0 < index.stored_local_bytes() <= resident_max_bytes:
            make_resident(index, extractor.device)

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
    ) -> list[LocalizeResult]:
        """Prepared queries -> results: one model forward for all, one global search, then each query's
        re-ranking. top_k and rerank_k may differ per query."""
        n = len(queries)
        top_ks = [top_k] * n if isinstance(top_k, int) else list(top_k)
        rerank_ks = [rerank_k] * n if isinstance(rerank_k, int) else list(rerank_k)
        start = time.perf_counter()
        global_desc, local = self.extractor.extract_tensors(torch.stack([q.tensor for q in queries]))
        # the local maps stay where the model ran: re-ranking runs there too (on a GPU, ~100x faster)
        global_desc, local = global_desc.float().cpu().numpy(), local.float()
        extracted = time.perf_counter()
        scores, ids = global_search(self.index.index, global_desc, max(max(rerank_ks), max(top_ks)))
        search_s = time.perf_counter() - extracted
        results = []
        for i, query in enumerate(queries):
            rerank_start = time.perf_counter()
            depth = max(rerank_ks[i], top_ks[i])
            result = self._rerank(local[i], scores[i, :depth], ids[i, :depth], top_ks[i])
            timings = {
                "decode": query.decode_s,
                "extract": extracted - start,
                "search": search_s,
                "rerank": time.perf_counter() - rerank_start,
            }
            timings["total"] = sum(timings.values())
            result.timings_ms = Timings(**{k: round(v * 1e3, 2) for k, v in timings.items()})
            results.append(result)
        return results

    def localize(
        self,
        source: ImageSource,
        name: str | None = None,
        top_k: int = DEFAULT_TOP_K,
        rerank_k: int = DEFAULT_RERANK_K,
    ) -> LocalizeResult:
        return self.run([self.prepare(source, name)], top_k, rerank_k)[0]

    def _rerank(
        self, query_local: torch.Tensor, scores: np.ndarray, ids: np.ndarray, top_k: int
    ) -> LocalizeResult:
        keep = ids >= 0  # approximate indexes may return fewer results
        scores, ids = scores[keep], ids[keep]
        device = query_local.device
        cands = self.index.candidate_maps(ids.tolist(), device)
        counts = mnn_scores(query_local, cands, self.precision, device=device)
        order = rerank_order(counts)[:top_k]
        records = self.index.records(ids[order].tolist())
        matches = [
            _match(record, rank, float(scores[i]), int(counts[i]))
            for rank, (i, record) in enumerate(zip(order, records, strict=True), start=1)
        ]
        positions = query_local.shape[0] * query_local.shape[1]
        return LocalizeResult(
            matches=matches,
            location=estimate_location(matches, positions),
            index_version=self.index.name,
        )


def make_resident(index: IndexVersion, device: torch.device) -> None:
    start = time.perf_counter()
    try:
        index.make_resident(device)
    except torch.OutOfMemoryError:
        log.warning("index %s: its local maps do not fit on %s; reading them per query", index.name, device)
        return
    mib = index.stored_local_bytes() / 2**20
    log.info(
        "index %s: %.0f MiB of local maps on %s (%.1f s)",
        index.name,
        mib,
        device,
        time.perf_counter() - start,
    )


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
    loaded = load_model(source, resolve_device(device))
    return FeatureExtractor(
        loaded,
        local_mode=identity.local_mode,
        feature_block=identity.feature_block,
        image_size=identity.image_size,
        exif_transpose=identity.exif_transpose,
        model_dtype=identity.model_dtype,
    )


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
