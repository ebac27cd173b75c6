"""One build at a time, and cleaning up after crashes and superseded versions."""

from __future__ import annotations

import datetime as dt
import fcntl
import itertools
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from index_builder.errors import BuildInProgress, IndexNotFound
from index_builder.manifest import IndexManifest
from index_builder.store.segments import SEGMENT_FOLDERS, TMP_PREFIX
from index_builder.store.versions import CURRENT, VERSIONS, current_version_name, version_names

log = logging.getLogger(__name__)

LOCK = ".build.lock"
DEFAULT_GRACE_SECONDS = 600.0  # superseded versions stay this long for readers that opened them


class BuildLock:
    """An exclusive lock on INDEX_DIR/.build.lock, released when the process ends however it ends."""

    RETRY_SECONDS = 1.0  # a status probe holds the lock shared for microseconds

    def __init__(self, index_dir: Path) -> None:
        self.path = index_dir / LOCK
        self.fd: int | None = None

    def __enter__(self) -> BuildLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.RETRY_SECONDS
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise BuildInProgress("another build is running on this index") from None
                time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def build_running(index_dir: Path) -> bool:
    """Whether a build holds the lock (probed with a shared lock, released at once; a build starting in
    that instant retries)."""
    path = index_dir / LOCK
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def remove_unfinished(index_dir: Path) -> None:
    """After a crash: staging directories, and versions written but never published. Needs the lock."""
    for parent in (*(index_dir / f for f in SEGMENT_FOLDERS), index_dir / VERSIONS):
        if parent.is_dir():
            for entry in parent.iterdir():
                if entry.name.startswith(TMP_PREFIX):
                    shutil.rmtree(entry, ignore_errors=True)
    current = current_version_name(index_dir)
    for name in version_names(index_dir):
        if current is None or name > current:
            shutil.rmtree(index_dir / VERSIONS / name, ignore_errors=True)
    (index_dir / f"{CURRENT}.tmp").unlink(missing_ok=True)


@dataclass
class Removed:
    versions: list[str] = field(default_factory=list)
    segments: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def collect_garbage(index_dir: Path, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> Removed:
    """Drop versions superseded more than grace_seconds ago, then segments no remaining version uses.
    Needs the lock. Readers that opened a dropped version keep working: open files outlive unlinking.
    A version folder without a readable manifest (a removal cut short) is removed unless it is CURRENT;
    while any kept version is unreadable no segment is removed, since its segments cannot be known."""
    current = current_version_name(index_dir)
    removed = Removed()
    for older, newer in itertools.pairwise(version_names(index_dir)):
        if older != current and time.time() - _created_at(index_dir / VERSIONS / newer) > grace_seconds:
            shutil.rmtree(index_dir / VERSIONS / older, ignore_errors=True)
            removed.versions.append(older)
    kept_segments: set[str] = set()
    segments_known = True
    for name in version_names(index_dir):
        try:
            kept_segments |= {s.name for s in IndexManifest.read(index_dir / VERSIONS / name).segments}
        except IndexNotFound as exc:
            if name == current:
                segments_known = False
                removed.problems.append(f"the published version is unreadable: {exc}")
            else:
                shutil.rmtree(index_dir / VERSIONS / name, ignore_errors=True)
                removed.versions.append(name)
                log.warning("removed version folder %s: %s", name, exc)
    for folder in SEGMENT_FOLDERS:
        segments_dir = index_dir / folder
        if segments_known and segments_dir.is_dir():
            for entry in segments_dir.iterdir():
                if not entry.name.startswith(TMP_PREFIX) and entry.name not in kept_segments:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.segments.append(entry.name)
    return removed


def _created_at(version_dir: Path) -> float:
    try:
        return dt.datetime.fromisoformat(IndexManifest.read(version_dir).created_at).timestamp()
    except (IndexNotFound, ValueError):
        try:
            return version_dir.stat().st_mtime
        except OSError:
            return 0.0
