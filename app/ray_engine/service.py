"""The service behind the HTTP API of `serve --engine ray`: the single-process VPRService with the model
forward and the search done by other deployments (remote_search.RemoteLocalizer).

The ingress keeps a model for what is cheap or per-request (decoding and preprocessing uploads, the
match pairs of /localize/pairs) and the index's metadata (references, names, locations); the encoder
deployment runs the forward of /localize, the shard deployments search, the rebuilder deployment runs
POST /index/rebuild's builds (app/ray_engine/rebuilds.py). A version published by it (or by
`selavpr index build` on the shared index folder) is served without a restart once every shard has
opened it (same model and number of shards; otherwise deploy again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from app.errors import ServiceUnavailable
from app.metrics import Metrics
from app.ray_engine.remote_search import CallPolicy, RemoteLocalizer
from app.rebuild import RebuildState
from app.service import LocalizeJob, VPRService, served_extractor
from app.settings import Settings
from index_builder.errors import CheckpointMismatch
from index_builder.results import LocalizeResult
from index_builder.search import check_compatible
from index_builder.sharding import shard_key
from index_builder.store import IndexNotFound, IndexStoreError, IndexVersion, current_version_name
from model.matching.defaults import resolve_precision

log = logging.getLogger(__name__)
HEALTH_PERIOD_S = 2.0
NO_MAPS = np.zeros(0, dtype=np.int64)  # the ingress reads no id-map rows at opening (IndexVersion only_ids)
REBUILDER_TIMEOUT_S = 10.0  # a request or a state read of the rebuilder (it answers from memory)
NO_REBUILDER = (
    "rebuilding is not served by this deployment (no rebuilder): run `selavpr index build` on the index "
    "folder; the new version is served when published"
)


class RemoteRebuilds:
    """What the routers use of RebuildManager (request, status, wait), answered by the rebuilder
    deployment. Blocking calls: the routers make them from the thread pool."""

    def __init__(self, handle, timeout_s: float = REBUILDER_TIMEOUT_S) -> None:
        self.handle, self.timeout_s = handle, timeout_s
        self._last = RebuildState()  # for callers on the event loop (readiness), which must not block

    def request(self) -> tuple[str, str]:
        return tuple(self._call(self.handle.request.remote()))

    @property
    def status(self) -> RebuildState:
        if _on_event_loop():
            return self._last
        self._last = self._call(self.handle.state.remote())
        return self._last

    def wait(self, timeout: float | None = None) -> None:
        """Builds run in the rebuilder's process; nothing to wait for here."""

    def _call(self, response):
        try:
            return response.result(timeout_s=self.timeout_s)
        except Exception as exc:  # a dead or busy rebuilder replica: say so, do not hang the request
            response.cancel()
            log.warning("the rebuilder did not answer: %s", type(exc).__name__)
            raise ServiceUnavailable("the rebuilder did not answer; retry later", retry_after_s=5) from None


class RayVPRService(VPRService):
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        version: str,
        encoder,
        shards: Sequence,
        rebuilder=None,
        shard_device: str = "cpu",
    ) -> None:
        """shard_device: where the shard replicas count ("cuda" with --shard-num-gpus); the precision of
        the counts is that device's default, as in the single process on it."""
        super().__init__(settings, metrics)
        self.shard_device = torch.device(shard_device)
        self.version_name, self.encoder, self.shard_handles = version, encoder, list(shards)
        if rebuilder is None:
            self.rebuilds_disabled = NO_REBUILDER
        else:
            self.rebuilds = RemoteRebuilds(rebuilder)
        self.shards_down: list[str] = []  # shards whose replicas did not answer the last health check
        self._refused: str | None = None  # a published version that cannot be served here
        self._health: asyncio.Task | None = None

    async def start(self) -> None:
        await super().start()
        self._health = asyncio.ensure_future(self._watch_shards())

    async def stop(self) -> None:
        if self._health:
            self._health.cancel()
        await super().stop()

    def _load(self) -> None:
        # preprocessing and /localize/pairs only: the encoder deployment has the accelerator
        self.extractor = served_extractor(self.settings, "cpu")
        self.reload_index()

    def reload_index(self) -> None:
        """Open the version the shards were deployed with (metadata only)."""
        try:
            self._serve(self._localizer_for(self.version_name))
        except (IndexNotFound, IndexStoreError, CheckpointMismatch, ValueError) as exc:
            log.error("cannot serve index %s: %s", self.version_name, exc)
            self.index_problem = str(exc)

    def _localizer_for(self, name: str) -> RemoteLocalizer:
        # metadata only: /localize/pairs reads one reference's map, its row looked up then
        version = IndexVersion(self.settings.index_dir, name, load_global=False, only_ids=NO_MAPS)
        try:
            check_compatible(version, self.extractor)
            shards = max(1, len(version.manifest.location_shards))
            if shards != len(self.shard_handles):
                deployed = len(self.shard_handles)
                raise ValueError(
                    f"{name} has {shards} location shards, the application {deployed}: deploy again"
                )
        except Exception:
            version.close()
            raise
        mode = resolve_precision(self.settings.precision, self.shard_device, version.identity.local_shape)
        policy = CallPolicy(timeout_s=self.settings.shard_timeout_s)
        return RemoteLocalizer(version, self.encoder, self.shard_handles, mode, self.metrics, policy)

    def _serve(self, localizer: RemoteLocalizer) -> None:
        """Swap the served version: batches already running keep the localizer (and version) they took."""
        self.localizer, self.index_problem = localizer, None
        self.version_name = localizer.index.name
        self.metrics.index_images.set(len(localizer.index))
        self.metrics.index_version.info({"version": localizer.index.name})
        log.info("serving index %s (%d images)", localizer.index.name, len(localizer.index))

    async def _follow_published(self) -> None:
        """A newly published version (`selavpr index build` on the shared index folder) is served once
        every shard deployment has opened it; the shards keep the previous one open for the queries
        still using it, so the switch drops no request. A version that cannot be served (another model,
        another number of shards) is logged and skipped."""
        name = current_version_name(self.settings.index_dir)
        if name is None or name in (self.version_name, self._refused):
            return
        try:
            localizer = await asyncio.to_thread(self._localizer_for, name)
        except (IndexNotFound, IndexStoreError, CheckpointMismatch, ValueError) as exc:
            log.error("not switching to %s: %s", name, exc)
            self._refused = name
            return
        opened = await asyncio.gather(*(self._call(h.load.remote(name)) for h in self.shard_handles))
        if not all(opened):
            log.warning("not switching to %s yet: a shard did not open it; trying again", name)
            localizer.index.close()
            return
        self._serve(localizer)

    def readiness(self) -> str | None:
        reason = super().readiness()
        if reason is None and len(self.shards_down) == len(self.shard_handles):
            return f"no location shard has a replica ({', '.join(self.shards_down)})"
        return reason

    def readiness_details(self) -> dict:
        return {"shards_without_replica": list(self.shards_down)}

    async def _watch_shards(self) -> None:
        """Now and then: ping every shard deployment (/readyz lists those that did not answer), and
        follow the published version."""
        while True:
            replies = await asyncio.gather(
                *(self._call(handle.ping.remote()) for handle in self.shard_handles)
            )
            self.shards_down = [shard_key(k) for k, ok in enumerate(replies) if not ok]
            try:
                await self._follow_published()
            except Exception:  # the watch must go on: a failed switch is retried on the next round
                log.exception("following the published index version failed")
            await asyncio.sleep(HEALTH_PERIOD_S)

    async def _call(self, response) -> bool:
        """Whether a call answered within the deadline (twice the shard deadline: opening a version
        reads its files)."""
        call = asyncio.ensure_future(_awaitable(response))
        call.add_done_callback(_retrieved)  # a call cancelled after its deadline fails unseen: no log noise
        try:
            await asyncio.wait_for(asyncio.shield(call), 2 * self.settings.shard_timeout_s)
        except Exception:
            response.cancel()
            return False
        return True

    def _localize_batch(self, localizer, jobs: Sequence[LocalizeJob]) -> list[LocalizeResult]:
        started = time.perf_counter()
        results = localizer.run(
            torch.stack([j.query.tensor for j in jobs]),
            [j.top_k for j in jobs],
            [j.rerank_k for j in jobs],
            [j.prior for j in jobs],
        )
        for job, result in zip(jobs, results, strict=True):
            result.timings_ms.decode = round(job.query.decode_s * 1e3, 2)
            result.timings_ms.total = round(
                result.timings_ms.decode + (time.perf_counter() - started) * 1e3, 2
            )
        return results


async def _awaitable(response):
    return await response


def _retrieved(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
