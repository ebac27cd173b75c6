"""The served version, verified in the background: after start, after each publish, then every
`verify_interval_s`, reading at most `verify_bytes_per_s` so that queries keep the disk.

Each pass also notices a CURRENT that names another version than the one served (`selavpr index
rollback`, or a build run beside the server) and has the service load it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from index_builder.errors import IndexNotFound
from index_builder.manifest import IndexManifest
from index_builder.store import VERSIONS
from index_builder.store.integrity import Throttle, Verification, VerificationStopped, verify_version

log = logging.getLogger(__name__)


class IndexVerifier:
    def __init__(
        self,
        index_dir: Path,
        bytes_per_s: float,
        interval_s: float,
        served: Callable[[], str | None],
        on_result: Callable[[Verification], None],
        before_pass: Callable[[], None] = lambda: None,
    ) -> None:
        """`served` names the version being served (None: none); `before_pass` runs first in every
        pass (the service reloads a changed CURRENT there)."""
        self.index_dir, self.bytes_per_s, self.interval_s = index_dir, bytes_per_s, interval_s
        self.served, self.on_result, self.before_pass = served, on_result, before_pass
        self.last: Verification | None = None
        self.last_finished: float | None = None  # time.time() of the last pass's end
        self._stop, self._wake = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="index-verifier", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def request(self) -> None:
        """Verify again now (or right after the pass under way): a new version is served."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.before_pass()
                self._wake.clear()  # after a reload there, whose request this pass answers
                self._pass()
            except VerificationStopped:
                return
            except Exception:  # a verifier that dies would report the last result forever
                log.exception("index verification failed to run")
            self._wake.wait(self.interval_s)

    def _pass(self) -> None:
        name = self.served()
        if name is None:
            return
        try:
            manifest = IndexManifest.read(self.index_dir / VERSIONS / name)
        except IndexNotFound as exc:
            result = Verification(version=name, ok=False, problems=[str(exc)])
        else:
            result = verify_version(self.index_dir, manifest, Throttle(self.bytes_per_s, self._stop))
        if self._stop.is_set():
            return
        self.last, self.last_finished = result, time.time()
        if not result.ok:
            log.error("the served index version %s is damaged: %s", name, "; ".join(result.problems))
        self.on_result(result)
