"""A build that fails gives back the disk space it took: nothing it wrote outlives it unpublished.

A build killed outright never gets here; its complete segments are reused by the next build, and what
that one does not reuse goes with the next clean-up (`remove_unfinished`, `collect_garbage`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import TracebackType

from index_builder.store.maintenance import Removed, collect_garbage, remove_unfinished
from index_builder.store.space import DiskFull, check_room, free_bytes, is_disk_full

log = logging.getLogger(__name__)
# A write that failed with this little room left failed for want of room, whatever the library that
# wrapped the error says (faiss reports a short write without its errno).
NEARLY_FULL_BYTES = 64 * 1024


def remove_unpublished(index_dir: Path) -> Removed:
    """Staging folders, versions never published and segments no version uses. Needs the build lock."""
    remove_unfinished(index_dir)
    return collect_garbage(index_dir, grace_seconds=math.inf)  # no published version goes


class UnpublishedCleanup:
    """Around a build, inside its lock: on any failure, `remove_unpublished`; a failure for want of
    room is raised again as DiskFull (what is free after the clean-up, and the build's estimate)."""

    def __init__(self, index_dir: Path) -> None:
        self.index_dir = index_dir
        self.needed_bytes: int | None = None

    def require(self, needed_bytes: int) -> None:
        """Refuse up front (DiskFull) when the index's disk has less than the build's estimate."""
        self.needed_bytes = needed_bytes
        check_room(self.index_dir, needed_bytes)

    def __enter__(self) -> UnpublishedCleanup:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            return
        full = is_disk_full(exc) or _free(self.index_dir) < NEARLY_FULL_BYTES
        try:
            removed = remove_unpublished(self.index_dir)
            log.info("failed build: removed %d unpublished segments", len(removed.segments))
        except OSError as cleanup_error:  # the original failure is the one to report
            log.error("cleaning up after a failed build: %s", cleanup_error)
        if full and isinstance(exc, Exception) and not isinstance(exc, DiskFull):
            raise DiskFull(_free(self.index_dir), self.needed_bytes) from exc


def _free(index_dir: Path) -> int:
    try:
        return free_bytes(index_dir)
    except OSError:
        return 0
