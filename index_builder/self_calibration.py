"""Build-time calibration: the index localizes a sample of its own located references and learns from
the answers which evidence means "right".

Each sampled reference is a query twice, with features already stored (no model forward):
1. leave-one-out: the image and its exact duplicates (same content) removed from the candidates; the
   answer is labelled by the distance between its location and the reference's;
2. place removed: every candidate within the radius of the reference also left out, the situation of a
   photo of a place missing from the database. It reuses the MNN counts of pass 1 (the same candidates,
   fewer of them), so it costs nothing more.
The answers are fitted (calibration.fit_calibration) and stored with the version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from index_builder.calibration import (
    DEFAULT_RADIUS_M,
    Calibration,
    Locations,
    Stage,
    fit_answers,
    labelled_answers,
)
from index_builder.store import ImageRecord
from model.matching import mnn_scores

log = logging.getLogger(__name__)

MIN_LOCATED = 8  # fewer located references: the version is served uncalibrated
MAX_SAMPLES = 40  # held-out references; the cost is MAX_SAMPLES x CANDIDATES local matchings
CANDIDATES = 10  # global candidates re-ranked per held-out reference

LocalReader = Callable[[Sequence[int]], torch.Tensor]  # ids -> float local maps (k, h, w, C)


@dataclass
class SelfCalibrationConfig:
    radius_m: float = DEFAULT_RADIUS_M
    max_samples: int = MAX_SAMPLES
    candidates: int = CANDIDATES
    min_located: int = MIN_LOCATED
    place_removed: bool = True  # also learn from answers for a place missing from the database
    seed: int = 0


def self_calibrate(
    records: Sequence[ImageRecord],
    global_desc: np.ndarray,
    read_local: LocalReader,
    precision: str | None,
    config: SelfCalibrationConfig | None = None,
    encoding_fingerprint: str = "",
) -> tuple[Calibration | None, str]:
    """(calibration, note): the fitted calibration, or None and why the version stays uncalibrated."""
    config = config or SelfCalibrationConfig()
    started = time.perf_counter()
    located = sum(1 for r in records if r.utm_east is not None)
    if located < config.min_located:
        return None, f"uncalibrated: {located} located references, at least {config.min_located} needed"
    answers, held_out = held_out_answers(records, global_desc, read_local, precision, config)
    source = f"leave-one-out over {held_out} of {located} located references" + (
        ", each also with its place removed" if config.place_removed else ""
    )
    calibration, reason = fit_answers(
        answers, "self", config.radius_m, source, encoding_fingerprint, config.min_located
    )
    if calibration is None:
        return None, f"uncalibrated: {reason}"
    calibration.seconds = round(time.perf_counter() - started, 3)
    return calibration, f"self-calibrated on {calibration.samples} answers"


def held_out_answers(
    records: Sequence[ImageRecord],
    global_desc: np.ndarray,
    read_local: LocalReader,
    precision: str | None,
    config: SelfCalibrationConfig,
) -> tuple[list[tuple[Stage, np.ndarray, float, bool]], int]:
    """The labelled answers (calibration.labelled_answers rows) of the sampled located references, and
    how many references were held out."""
    located = [r for r in records if r.utm_east is not None]
    locations = Locations.of(records)
    hashes = np.array([r.content_hash for r in records])
    rng = np.random.default_rng(config.seed)
    unique = list({r.content_hash: r for r in located}.values())  # one per content
    picked = rng.choice(len(unique), size=min(config.max_samples, len(unique)), replace=False)
    counter = _PairCounts(read_local, precision)
    with _one_thread():
        answers = [
            answer
            for i in sorted(picked.tolist())
            for answer in _answers(unique[i], hashes, locations, global_desc, counter, config)
        ]
    return answers, len(picked)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread while counting: one query against 10 small maps gains nothing from more, and
    on shared cores 2 threads made the same work take 0.4 to 4 s against a steady 0.3 s (a server's
    queries during a rebuild run on one thread for that long too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _answers(
    held_out: ImageRecord,
    hashes: np.ndarray,
    locations: Locations,
    global_desc: np.ndarray,
    counter: _PairCounts,
    config: SelfCalibrationConfig,
):
    """(stage, features, label, leave-one-out?) of one held-out reference's answers (leave-one-out, then
    place removed)."""
    scores = global_desc @ global_desc[held_out.id]
    scores[hashes == held_out.content_hash] = -np.inf  # the image and its exact duplicates
    available = int(np.isfinite(scores).sum())
    k = min(config.candidates, available)
    if k == 0:
        return
    ids = np.argsort(-scores, kind="stable")[:k]
    counts, positions = counter.counts(held_out.id, ids)
    view = locations.view(ids, scores[ids], counts, positions)
    truth = (held_out.utm_east, held_out.utm_north, int(locations.zone[held_out.id]))
    yield from labelled_answers(view, truth, config.radius_m, config.place_removed)


class _PairCounts:
    """MNN counts between stored references. A count is symmetric (a mutual pair is mutual from either
    side) and the held-out references are often each other's candidates, so each pair is counted once;
    decoded maps are kept up to `cache_bytes`."""

    def __init__(
        self, read_local: LocalReader, precision: str | None, cache_bytes: int = 128 * 2**20
    ) -> None:
        self.read_local, self.precision, self.cache_bytes = read_local, precision, cache_bytes
        self.known: dict[tuple[int, int], int] = {}
        self.maps: dict[int, torch.Tensor] = {}
        self.held_bytes = 0

    def counts(self, query: int, ids: np.ndarray) -> tuple[np.ndarray, int]:
        """(counts of `query` against `ids`, the query's local positions)."""
        query_map = self._maps([query])[0]
        todo = [int(i) for i in ids if _pair(query, i) not in self.known]
        if todo:
            fresh = mnn_scores(query_map, self._maps(todo), self.precision).numpy()
            self.known.update({_pair(query, i): int(c) for i, c in zip(todo, fresh, strict=True)})
        counts = np.array([self.known[_pair(query, int(i))] for i in ids], dtype=np.int64)
        return counts, query_map.shape[0] * query_map.shape[1]

    def _maps(self, ids: list[int]) -> torch.Tensor:
        missing = [i for i in ids if i not in self.maps]
        if missing:
            read = self.read_local(missing)
            for i, m in zip(missing, read, strict=True):
                if self.held_bytes + m.nbytes <= self.cache_bytes:
                    self.maps[i] = m
                    self.held_bytes += m.nbytes
            fresh = dict(zip(missing, read, strict=True))
        else:
            fresh = {}
        return torch.stack([self.maps[i] if i in self.maps else fresh[i] for i in ids])


def _pair(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a <= b else (b, a)
