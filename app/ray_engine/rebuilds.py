"""POST /index/rebuild on `serve --engine ray`: one deployment of one replica runs the builds, so that the
single process's rule holds across ingress replicas (one build at a time; a request while one runs
queues one more run, and further requests join it). It is the single process's RebuildManager and
builder (scan, plan, encode, publish); the ingress rolls the shards to what it publishes
(RayVPRService._follow_published).
"""

from __future__ import annotations

import dataclasses
import logging

from ray import serve

from app.rebuild import RebuildManager, RebuildState
from app.service import served_extractor
from app.settings import Settings
from index_builder.builder import BuildConfig

log = logging.getLogger(__name__)


@serve.deployment
class Rebuilder:
    """Builds the next version from the references folder (shared with the ingress, like the index
    folder), encoding in this replica's process on the CPU (it reserves no GPU)."""

    def __init__(self, settings: Settings) -> None:
        config = BuildConfig(
            references=settings.references, index_dir=settings.index_dir, grace_seconds=settings.grace_seconds
        )
        self.manager = RebuildManager(config, served_extractor(settings, "cpu"), on_published=_log_published)

    def request(self) -> tuple[str, str]:
        """(job id, "running" | "queued")."""
        return self.manager.request()

    def state(self) -> RebuildState:
        """A copy of the state now (the build thread goes on changing the manager's)."""
        state = self.manager.status
        progress = dataclasses.replace(state.progress) if state.progress else None
        return dataclasses.replace(state, progress=progress)


def _log_published(report) -> None:
    log.info("rebuild published %s; the ingress rolls the shards to it", report.version)
