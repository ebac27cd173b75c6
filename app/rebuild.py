"""Index rebuilds in the background, one at a time: a request while one runs joins it."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from app.heap import trim_heap
from index_builder.builder import BuildConfig, BuildProgress, build_index
from index_builder.manifest import BuildReport
from model.extractor import FeatureExtractor

log = logging.getLogger(__name__)


@dataclass
class RebuildState:
    state: str = "idle"  # idle, running, failed
    job_id: str | None = None
    progress: BuildProgress | None = None
    last_report: BuildReport | None = None
    last_error: str | None = None
    started_at: float | None = field(default=None, repr=False)


class RebuildManager:
    def __init__(
        self,
        config: BuildConfig,
        extractor: FeatureExtractor,
        on_published: Callable[[BuildReport], None],
        on_progress: Callable[[BuildProgress], None] = lambda p: None,
        on_finished: Callable[[str, float], None] = lambda outcome, seconds: None,
    ) -> None:
        self.config, self.extractor = config, extractor
        self.on_published, self.on_progress, self.on_finished = on_published, on_progress, on_finished
        self.status = RebuildState()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def request(self) -> RebuildState:
        """Start a rebuild, or join the one running. Returns the state with the job id."""
        with self._lock:
            if self.status.state != "running":
                self.status.state, self.status.job_id = "running", uuid.uuid4().hex[:12]
                self.status.progress, self.status.started_at = BuildProgress(), time.monotonic()
                self._thread = threading.Thread(target=self._run, name="rebuild", daemon=True)
                self._thread.start()
            return self.status

    def wait(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        started = self.status.started_at or time.monotonic()
        try:
            report = build_index(self.config, extractor=self.extractor, on_progress=self._progress)
        except Exception as exc:  # reported through /index/status; the published version keeps serving
            log.exception("rebuild failed")
            with self._lock:
                self.status.state, self.status.last_error = "failed", f"{type(exc).__name__}: {exc}"
            self.on_finished("failed", time.monotonic() - started)
            return
        try:
            self.on_published(report)
            trim_heap()  # the build's batches were freed; give the pages back
        finally:
            with self._lock:
                self.status.state, self.status.last_report, self.status.last_error = "idle", report, None
            self.on_finished("published", time.monotonic() - started)

    def _progress(self, progress: BuildProgress) -> None:
        self.status.progress = progress
        self.on_progress(progress)
