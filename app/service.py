"""The running service: the model, the served index version, the batcher and the rebuilds.

Loaded once at start-up. The served version is swapped atomically when a rebuild publishes a new one;
batches already running keep the version they started with.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from app.batching import MicroBatcher, QueueFull
from app.errors import ServiceUnavailable
from app.match_pairs import match_pairs
from app.metrics import Metrics
from app.rebuild import RebuildManager
from app.reference_images import record_of
from app.settings import Settings
from app.verifier import IndexVerifier
from index_builder.builder import BuildConfig, BuildProgress
from index_builder.errors import CheckpointMismatch
from index_builder.results import LocalizeResult
from index_builder.rollback import rollback
from index_builder.search import Localizer, Query, prepare_query
from index_builder.sharding import LocationPrior
from index_builder.sources import scan_references
from index_builder.store import IndexNotFound, IndexStoreError, IndexVersion, current_version_name
from index_builder.store.integrity import Verification
from index_builder.store.space import free_bytes
from model.errors import SelavprError
from model.extractor import FeatureExtractor
from model.preprocess import MemoryBudget

log = logging.getLogger(__name__)


@dataclass
class LocalizeJob:
    query: Query
    top_k: int
    rerank_k: int
    prior: LocationPrior | None = None


@dataclass
class PairsJob:
    """The matched positions of a query and one reference (/localize/pairs): a forward and one MNN
    count, queued with the /localize queries so that it shares their bounds (queue, deadline, one
    model thread) instead of running beside them."""

    query: Query
    reference_id: int
    max_pairs: int


def served_extractor(settings: Settings, device: str | None = None) -> FeatureExtractor:
    """The model as the settings describe it (on `device` instead of settings.device when given)."""
    options = settings.model_options()
    return FeatureExtractor.from_options(options.on(device or options.device), max_pixels=settings.max_pixels)


class VPRService:
    rebuilds_disabled: str | None = None  # why /index/rebuild is not offered, where it is not

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.extractor: FeatureExtractor | None = None
        self.localizer: Localizer | None = None
        self.index_problem: str | None = "starting"
        self.rebuilds: RebuildManager | None = None
        self.verifier: IndexVerifier | None = None
        self._reload_lock = threading.Lock()  # the verifier and a finished rebuild may both reload
        # Two lanes, each with its own worker thread: queries re-ranking more than heavy_rerank_k candidates
        # (and whole requests of them) wait and run in the heavy lane, so an ordinary query never waits
        # for their batches; the two share the cores while both run. One lane measured 7.1x the idle p95
        # for ordinary queries beside 16 clients of rerank_k=1000 batches (docs/benchmarks.md).
        self.batcher, self.heavy = self._lane(), self._lane()
        self.decode_budget = MemoryBudget(settings.decode_memory_bytes)
        metrics.index_free_bytes.set_function(lambda: _free_bytes_or_nan(settings.index_dir))

    def _lane(self) -> MicroBatcher:
        s = self.settings
        return MicroBatcher(
            self._run_batch,
            s.max_batch_size,
            s.max_batch_wait_ms / 1e3,
            on_batch=self.metrics.batch_size.observe,
            max_queued=s.max_queued_queries,
            max_cost=s.max_candidates_per_request,
        )

    # --- life cycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self.batcher.start()
        self.heavy.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        await self.heavy.stop()
        if self.verifier:
            await asyncio.to_thread(self.verifier.stop)
        if self.rebuilds:
            self.rebuilds.wait(timeout=5)

    def _load(self) -> None:
        s = self.settings
        self.extractor = served_extractor(s)
        log.info("serving %s on %s", self.extractor.info.description, self.extractor.device)
        self.rebuilds = RebuildManager(
            BuildConfig(
                references=s.references,
                index_dir=s.index_dir,
                model=s.model_options(),
                grace_seconds=s.grace_seconds,
            ),
            self.extractor,
            on_published=lambda report: self.reload_index(),
            on_progress=self._progress,
            on_finished=self._finished,
        )
        self.reload_index()
        if self.localizer is None and s.build_on_start and _has_images(s.references):
            log.info("no usable index in %s; building one from %s", s.index_dir, s.references)
            self.rebuilds.request()
        if s.verify_bytes_per_s > 0:
            self.verifier = IndexVerifier(
                s.index_dir,
                s.verify_bytes_per_s,
                s.verify_interval_s,
                served=self.served_version,
                on_result=self._verified,
                before_pass=self._follow_current,
            )
            self.verifier.start()

    # --- the served index ----------------------------------------------------------------------------

    def reload_index(self) -> None:
        """Open the published version and serve it (the previous one closes when its last batch ends)."""
        with self._reload_lock:
            self._reload_index()
        if self.verifier is not None:
            self.verifier.request()

    def _reload_index(self) -> None:
        try:
            version = IndexVersion.open_current(self.settings.index_dir)
        except IndexNotFound as exc:  # its message names no path, only what to do
            self.index_problem = str(exc)
            return
        except IndexStoreError as exc:  # the full text (with paths) goes to the log only
            log.error("the published index version cannot be opened: %s", exc)
            self.index_problem = "the published index version is damaged (see the server log)"
            return
        try:
            localizer = Localizer(
                version, self.extractor, self.settings.precision, self.settings.resident_maps_bytes
            )
        except CheckpointMismatch as exc:
            version.close()
            log.error("%s", exc)
            self.index_problem = (
                "the index was built with another model "
                "(POST /index/rebuild re-encodes it with the served one)"
            )
            return
        self.localizer, self.index_problem = localizer, None
        self.metrics.index_images.set(len(version))
        self.metrics.index_version.info({"version": version.name})
        log.info("serving index %s (%d images)", version.name, len(version))

    # --- verification of the served version ------------------------------------------------------------

    def _follow_current(self) -> None:
        """Serve what CURRENT names when it names another version (a rollback, a build beside us)."""
        if self.rebuilds is not None and self.rebuilds.status.state == "running":
            return  # a build of ours reloads when it publishes
        published = current_version_name(self.settings.index_dir)
        if published is not None and published != self.served_version():
            log.info("CURRENT names %s; loading it", published)
            self.reload_index()

    def served_version(self) -> str | None:
        return self.localizer.index.name if self.localizer else None

    def _verified(self, result: Verification) -> None:
        self.metrics.index_intact.set(1 if result.ok else 0)
        self.metrics.index_verified_at.set_to_current_time()
        self.metrics.index_verify_problems.set(len(result.problems))
        if not result.ok and self.settings.auto_rollback and result.version == self.served_version():
            try:
                done = rollback(self.settings.index_dir)
            except IndexStoreError as exc:
                log.error("automatic rollback: %s", exc)
                return
            log.warning("automatic rollback: serving %s instead of %s", done.current, done.previous)
            self.metrics.rollbacks.inc()
            self.reload_index()

    def verification(self) -> Verification | None:
        """The last pass over the served version (None: none yet, or it was over another version)."""
        last = self.verifier.last if self.verifier else None
        return last if last is not None and last.version == self.served_version() else None

    def _progress(self, progress: BuildProgress) -> None:
        self.metrics.rebuild_progress.set(progress.done / progress.total if progress.total else 0.0)

    def _finished(self, outcome: str, seconds: float) -> None:
        self.metrics.rebuilds.labels(outcome).inc()
        if outcome == "disk_full":
            self.metrics.disk_full.labels("rebuild").inc()
        self.metrics.rebuild_seconds.observe(seconds)
        self.metrics.rebuild_progress.set(0.0)

    def readiness(self) -> str | None:
        """None when ready; otherwise why not."""
        if self.extractor is None:
            return "the model is loading"
        if not (self.batcher.alive and self.heavy.alive):
            return "the batching worker is restarting"
        if self.localizer is None:
            running = self.rebuilds is not None and self.rebuilds.status.state == "running"
            if running:
                return f"an index is being built ({self.index_problem})"
            return f"no index: {self.index_problem}"
        return None

    def readiness_details(self) -> dict:
        """More for /readyz to report (the Ray engine: location shards without a replica)."""
        return {}

    # --- localize ------------------------------------------------------------------------------------

    def prepare(self, data: bytes) -> Query:
        """Decode and preprocess an upload (runs in a worker thread, never on the event loop)."""
        if self.extractor is None:
            raise ServiceUnavailable("the model is loading")
        return prepare_query(self.extractor, data, "upload", self.decode_budget)

    def new_owner(self) -> int:
        """A turn-taking identity for one request's queries (see localize)."""
        return self.batcher.new_owner()

    async def localize(
        self,
        query: Query,
        top_k: int,
        rerank_k: int,
        owner: int | None = None,
        prior: LocationPrior | None = None,
    ) -> LocalizeResult:
        """One query through the batcher; `owner` (one per request) takes turns with other requests."""
        if self.localizer is None:
            raise ServiceUnavailable(self.readiness() or "no index")
        lane = self.heavy if rerank_k > self.settings.heavy_rerank_k else self.batcher
        owner = self.new_owner() if owner is None else owner  # one counter for both lanes
        try:
            result = await lane.submit(LocalizeJob(query, top_k, rerank_k, prior), owner, cost=rerank_k)
        except QueueFull:
            raise self._queue_full() from None
        self.metrics.observe_timings(result.timings_ms.model_dump())
        return result

    async def pairs(self, query: Query, reference_id: int, max_pairs: int) -> dict:
        """One PairsJob through the batcher (cost: one candidate); 404 for an id not in the index."""
        localizer = self.localizer
        if localizer is None:
            raise ServiceUnavailable(self.readiness() or "no index")
        record_of(localizer.index, reference_id)  # before queueing: a bad id costs no model time
        try:
            return await self.batcher.submit(PairsJob(query, reference_id, max_pairs), cost=1)
        except QueueFull:
            raise self._queue_full() from None

    def _queue_full(self) -> ServiceUnavailable:
        """What a client hears when too many queries wait (503 with Retry-After), counted."""
        self.metrics.errors.labels("queue_full").inc()
        return ServiceUnavailable(
            "too many queries waiting; retry later", retry_after_s=self.settings.retry_after_s
        )

    def _run_batch(self, jobs: Sequence[LocalizeJob | PairsJob]) -> list[LocalizeResult | dict]:
        localizer = self.localizer  # one version for the whole batch
        if localizer is None:
            raise ServiceUnavailable(self.readiness() or "no index")
        results: list[LocalizeResult | dict | None] = [None] * len(jobs)
        batched = [i for i, job in enumerate(jobs) if isinstance(job, LocalizeJob)]
        if batched:
            found = self._localize_batch(localizer, [jobs[i] for i in batched])
            for i, result in zip(batched, found, strict=True):
                results[i] = result
        for i, job in enumerate(jobs):
            if isinstance(job, PairsJob):
                results[i] = match_pairs(
                    self.extractor,
                    localizer.index,
                    job.query,
                    job.reference_id,
                    job.max_pairs,
                    self.settings.precision,
                )
        return results

    def _localize_batch(self, localizer: Localizer, jobs: Sequence[LocalizeJob]) -> list[LocalizeResult]:
        """The batch's /localize queries, in one model forward (the Ray engine sends them to its encoder)."""
        return localizer.run(
            [j.query for j in jobs],
            [j.top_k for j in jobs],
            [j.rerank_k for j in jobs],
            [j.prior for j in jobs],
        )


def _free_bytes_or_nan(path) -> float:
    try:
        return float(free_bytes(path))
    except OSError:
        return float("nan")


def _has_images(references) -> bool:
    try:
        return bool(scan_references(references))
    except SelavprError:
        return False
