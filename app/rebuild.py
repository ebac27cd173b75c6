"""Index rebuilds in the background, one at a time. A request while one runs queues one more run (the
running one may have scanned the folder already); further requests join that queued run."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from app.heap import trim_heap
from index_builder.builder import BuildConfig, BuildProgress, build_index
from index_builder.encoding import Encoder
from index_builder.manifest import BuildReport
from index_builder.store.space import DiskFull, storage_problem
from model.extractor import FeatureExtractor

log = logging.getLogger(__name__)


@dataclass
class RebuildState:
    state: str = "idle"  # idle, running, failed
    job_id: str | None = None
    progress: BuildProgress | None = None
    last_report: BuildReport | None = None
    last_error: str | None = None
    queued_job_id: str | None = None  # the run that starts when this one ends
    started_at: float | None = field(default=None, repr=False)


class RebuildManager:
    def __init__(
        self,
        config: BuildConfig,
        extractor: FeatureExtractor,
        on_published: Callable[[BuildReport], None],
        on_progress: Callable[[BuildProgress], None] = lambda p: None,
        on_finished: Callable[[str, float], None] = lambda outcome, seconds: None,
        make_encoder: Callable[[], Encoder | None] = lambda: None,
    ) -> None:
        """make_encoder: the encoder of each build (None: the builder's own, in this process)."""
        self.config, self.extractor, self.make_encoder = config, extractor, make_encoder
        self.on_published, self.on_progress, self.on_finished = on_published, on_progress, on_finished
        self.status = RebuildState()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def request(self) -> tuple[str, str]:
        """Start a rebuild, or queue one after the running one. Returns (job id, "running" | "queued")."""
        with self._lock:
            if self.status.state == "running":
                self.status.queued_job_id = self.status.queued_job_id or _new_job_id()
                return self.status.queued_job_id, "queued"
            self._begin(_new_job_id())
            self._thread = threading.Thread(target=self._run_all, name="rebuild", daemon=True)
            self._thread.start()
            return self.status.job_id or "", "running"

    def _begin(self, job_id: str) -> None:
        self.status.state, self.status.job_id = "running", job_id
        self.status.progress, self.status.started_at = BuildProgress(), time.monotonic()

    def _run_all(self) -> None:
        """This run, then the one queued meanwhile, if any. The state leaves "running" only when no run
        is queued, under the lock, so a request can never start a second thread beside this one."""
        while True:
            report, error = self._run()
            with self._lock:
                if report is not None:
                    self.status.last_report, self.status.last_error = report, None
                else:
                    self.status.last_error = error
                queued, self.status.queued_job_id = self.status.queued_job_id, None
                if queued is None:
                    self.status.state = "idle" if report is not None else "failed"
                    return
                self._begin(queued)

    def wait(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> tuple[BuildReport | None, str | None]:
        """One build: (its report, None) when published, (None, a public error) when it failed."""
        started = self.status.started_at or time.monotonic()
        try:
            report = build_index(
                self.config, extractor=self.extractor, on_progress=self._progress, encoder=self.make_encoder()
            )
        except Exception as exc:  # reported through /index/status; the published version keeps serving
            log.exception("rebuild failed")
            full = isinstance(exc, DiskFull)
            self.on_finished("disk_full" if full else "failed", time.monotonic() - started)
            # Public (GET /index/status): the kind of failure, not its text (paths); the log has it.
            # A storage fault is said in words without paths (space free and needed, read-only).
            problem = storage_problem(exc)
            if problem:
                return None, f"rebuild failed: {problem}"
            return None, f"rebuild failed ({type(exc).__name__}); see the server log"
        try:
            self.on_published(report)
            trim_heap()  # the build's batches were freed; give the pages back
        finally:
            self.on_finished("published", time.monotonic() - started)
        return report, None

    def _progress(self, progress: BuildProgress) -> None:
        self.status.progress = progress
        self.on_progress(progress)


def _new_job_id() -> str:
    return uuid.uuid4().hex[:12]
