"""The service behind the HTTP API of `serve --engine ray`: the single-process VPRService with the model
forward and the search done by other deployments (remote_search.RemoteLocalizer).

The ingress keeps a model for what is cheap or per-request (decoding and preprocessing uploads, the
match pairs of /localize/pairs) and the index's metadata (references, names, locations); the encoder
deployment runs the forward of /localize, the shard deployments search. Rebuilding is not offered here:
build with `selavpr index build --shards N`, then deploy again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import torch

from app.errors import ServiceUnavailable
from app.metrics import Metrics
from app.ray_engine.remote_search import CallPolicy, RemoteLocalizer
from app.service import LocalizeJob, VPRService
from app.settings import Settings
from index_builder.errors import CheckpointMismatch
from index_builder.results import LocalizeResult
from index_builder.search import check_compatible
from index_builder.sharding import shard_key
from index_builder.store import IndexNotFound, IndexStoreError, IndexVersion
from model.extractor import FeatureExtractor
from model.matching.defaults import resolve_precision

log = logging.getLogger(__name__)
HEALTH_PERIOD_S = 2.0
REBUILD_ELSEWHERE = (
    "rebuilding is not served with --engine ray: run `selavpr index build --shards N`, then deploy again"
)


class RayVPRService(VPRService):
    rebuilds_disabled = REBUILD_ELSEWHERE

    def __init__(self, settings: Settings, metrics: Metrics, version: str, encoder, shards: Sequence) -> None:
        super().__init__(settings, metrics)
        self.version_name, self.encoder, self.shard_handles = version, encoder, list(shards)
        self.shards_down: list[str] = []  # shards whose replicas did not answer the last health check
        self._health: asyncio.Task | None = None

    async def start(self) -> None:
        await super().start()
        self._health = asyncio.ensure_future(self._watch_shards())

    async def stop(self) -> None:
        if self._health:
            self._health.cancel()
        await super().stop()

    def _load(self) -> None:
        s = self.settings
        self.extractor = FeatureExtractor.from_checkpoint(
            s.checkpoint,
            "cpu",  # preprocessing and /localize/pairs only: the encoder deployment has the accelerator
            image_size=s.image_size,
            local_mode=s.local_mode,
            feature_block=s.feature_block,
            max_pixels=s.max_pixels,
            model_dtype=s.model_dtype,
        )
        self.reload_index()

    def reload_index(self) -> None:
        """Open the version the shards were deployed with (metadata only)."""
        try:
            version = IndexVersion(self.settings.index_dir, self.version_name, load_global=False)
            check_compatible(version, self.extractor)
        except (IndexNotFound, IndexStoreError, CheckpointMismatch) as exc:
            log.error("cannot serve index %s: %s", self.version_name, exc)
            self.index_problem = str(exc)
            return
        mode = resolve_precision(self.settings.precision, torch.device("cpu"))
        policy = CallPolicy(timeout_s=self.settings.shard_timeout_s)
        self.localizer = RemoteLocalizer(
            version, self.encoder, self.shard_handles, mode, self.metrics, policy
        )
        self.index_problem = None
        self.metrics.index_images.set(len(version))
        self.metrics.index_version.info({"version": version.name})

    def readiness(self) -> str | None:
        reason = super().readiness()
        if reason is None and len(self.shards_down) == len(self.shard_handles):
            return f"no location shard has a replica ({', '.join(self.shards_down)})"
        return reason

    def readiness_details(self) -> dict:
        return {"shards_without_replica": list(self.shards_down)}

    async def _watch_shards(self) -> None:
        """Ping every shard deployment now and then: /readyz lists those that did not answer."""
        while True:
            replies = await asyncio.gather(
                *(self._ping(handle) for handle in self.shard_handles), return_exceptions=True
            )
            self.shards_down = [shard_key(k) for k, ok in enumerate(replies) if ok is not True]
            await asyncio.sleep(HEALTH_PERIOD_S)

    async def _ping(self, handle) -> bool:
        response = handle.ping.remote()
        try:
            await asyncio.wait_for(asyncio.shield(_awaitable(response)), self.settings.shard_timeout_s)
        except Exception:
            response.cancel()
            return False
        return True

    def _run_batch(self, jobs: Sequence[LocalizeJob]) -> list[LocalizeResult]:
        localizer = self.localizer
        if localizer is None:
            raise ServiceUnavailable(self.readiness() or "no index")
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
