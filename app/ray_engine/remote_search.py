"""The router of `serve --engine ray`: queries -> the encoder deployment -> the location-shard deployments
-> one answer, with the search logic of index_builder.shard_search (the same as the single process).

Every call to another deployment has a deadline and is retried once (Serve does not retry a request whose
replica died, and a call routed to a dead replica can hang until its caller gives up). A shard still
missing after the retry is left out: the answer says so (`partial`, `missing_shards`, `coverage`).

Handles are duck-typed (`handle.method.remote(...)` returns something with `result(timeout_s=...)` and
`cancel()`), so nothing here imports ray. It runs in the batcher's worker thread, where blocking on a
response is allowed (never on the replica's event loop).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.errors import ServiceUnavailable
from app.metrics import Metrics
from index_builder.results import LocalizeResult, Timings
from index_builder.search import answer
from index_builder.shard_search import Candidates, merge, rerank_counts, shards_to_search
from index_builder.sharding import LocationPrior, shard_key
from index_builder.store import IndexVersion
from model.matching.compact import CompactQuery, compact_query
from model.matching.precision import Precision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallPolicy:
    timeout_s: float = 5.0  # each try of each call to a deployment
    retries: int = 1


@dataclass
class ShardReply:
    """What one shard answered for one call (the version guards against a shard serving another one)."""

    version: str
    value: Any


class RemoteLocalizer:
    """A published version searched through deployments. `index` is the version opened for its
    metadata only (records, shard sizes); the shards hold the global indexes and the maps."""

    def __init__(
        self,
        index: IndexVersion,
        encoder,
        shards: Sequence,
        mode: Precision,
        metrics: Metrics,
        policy: CallPolicy = CallPolicy(),
    ) -> None:
        self.index, self.encoder, self.shards, self.mode = index, encoder, list(shards), mode
        self.metrics, self.policy = metrics, policy

    # --- calls with a deadline and a retry --------------------------------------------------------

    def _call_all(
        self, call: str, make: Mapping[int, Callable[[], Any]], shard_calls: bool = True
    ) -> tuple[dict[int, Any], set[int]]:
        """Start make[k]() for every k at once, wait for all within one deadline, retry the failed ones
        once. Returns the answers by k and the ks still missing. With shard_calls, k is a shard position
        (for the metrics) and an answer from another index version counts as a failure."""
        answers: dict[int, Any] = {}
        todo = dict(make)
        for attempt in range(1 + self.policy.retries):
            started = time.monotonic()
            deadline = started + self.policy.timeout_s
            pending = {k: start() for k, start in todo.items()}
            for k, response in pending.items():
                try:
                    reply = response.result(timeout_s=max(0.0, deadline - time.monotonic()))
                except Exception as exc:  # a timeout, a dead replica, an error in it: the same to the caller
                    response.cancel()
                    kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
                    name = shard_key(k) if shard_calls else "encoder"
                    log.warning("%s %s (try %d): %s", name, call, attempt + 1, kind)
                    if shard_calls:
                        self.metrics.shard_failures.labels(name, kind).inc()
                    continue
                if shard_calls:
                    if reply.version != self.index.name:
                        self.metrics.shard_failures.labels(shard_key(k), "other_version").inc()
                        continue
                    self.metrics.shard_seconds.labels(shard_key(k), call).observe(time.monotonic() - started)
                    reply = reply.value
                answers[k] = reply
            todo = {k: make[k] for k in todo if k not in answers}
            if not todo:
                break
        return answers, set(todo)

    def encode(self, tensors: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(Q, 3, H, W) preprocessed queries -> global (Q, D) and local (Q, h, w, C), one encoder call
        per query (the encoder batches them, across ingress replicas too)."""
        calls = {q: (lambda q=q: self.encoder.encode.remote(tensors[q].numpy())) for q in range(len(tensors))}
        encoded, missing = self._call_all("encode", calls, shard_calls=False)
        if missing:
            raise ServiceUnavailable("the encoder did not answer in time; retry later", retry_after_s=1)
        return (
            np.stack([encoded[q][0] for q in range(len(tensors))]),
            np.stack([encoded[q][1] for q in range(len(tensors))]),
        )

    def run(
        self,
        tensors: torch.Tensor,
        top_ks: Sequence[int],
        rerank_ks: Sequence[int],
        priors: Sequence[LocationPrior | None],
    ) -> list[LocalizeResult]:
        start = time.perf_counter()
        global_desc, local = self.encode(tensors)
        extracted = time.perf_counter()
        targets = [shards_to_search(self.index, prior) for prior in priors]
        depth = max(max(rerank_ks), max(top_ks))
        wanted = sorted(set().union(*targets))
        tops, missing_top = self._call_all(
            "top",
            {k: (lambda k=k: self.shards[k].top.remote(global_desc, depth, self.index.name)) for k in wanted},
        )
        search_s = time.perf_counter() - extracted
        results = []
        for i in range(len(tensors)):
            rerank_start = time.perf_counter()
            parts = [_candidates(tops[k][i], k) for k in targets[i] if k in tops]
            candidates = merge(parts, max(rerank_ks[i], top_ks[i]))
            counted = rerank_counts(candidates, self._count_remotely(local[i]), self.mode)
            counted.missing |= missing_top & set(targets[i])
            result = answer(
                self.index, torch.from_numpy(local[i]), candidates, counted, top_ks[i], targets[i]
            )
            if result.partial:
                self.metrics.partial_answers.inc()
                for key in result.missing_shards:
                    self.metrics.shard_partial.labels(key).inc()
            rerank_s = time.perf_counter() - rerank_start
            result.timings_ms = Timings(
                extract=round((extracted - start) * 1e3, 2),
                search=round(search_s * 1e3, 2),
                rerank=round(rerank_s * 1e3, 2),
            )
            results.append(result)
        return results

    def _count_remotely(self, query_local: np.ndarray):
        """The count function of shard_search.rerank_counts over the shards: the query map travels in the
        precision of each counting call (model/matching/compact.py), made once per precision."""
        h, w, _ = self.index.identity.local_shape
        compacted: dict[Precision, CompactQuery] = {}

        def count(ids_by_shard: Mapping[int, np.ndarray], mode: Precision) -> dict[int, torch.Tensor]:
            if mode not in compacted:
                compacted[mode] = compact_query(torch.from_numpy(query_local), mode, h * w)
            query = compacted[mode]
            calls = {
                k: (lambda k=k, ids=ids: self.shards[k].counts.remote(query, ids, str(mode), self.index.name))
                for k, ids in ids_by_shard.items()
            }
            answers, _ = self._call_all("counts", calls)
            return {k: torch.as_tensor(v) for k, v in answers.items()}

        return count


def _candidates(reply: tuple[np.ndarray, np.ndarray], position: int) -> Candidates:
    scores, ids = reply
    return Candidates(scores, ids, np.full(len(ids), position, dtype=np.int32))
