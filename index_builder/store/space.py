"""Disk space: what a build will need, what the disk has, and a full disk told apart from other faults.

The estimate is deliberately generous (a refusal up front costs nothing; a disk that fills half-way
costs the encoding done so far): the stored arrays of the images to encode, the new version's files
for every image, and a fixed margin for metadata and SQLite's journal.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from index_builder.errors import IndexStoreError
from index_builder.manifest import EncodingIdentity

MIB = 2**20
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
FULL_WORDS = ("No space left on device", "database or disk is full", "Disk quota exceeded")
NOT_WRITABLE = {
    errno.EROFS: "the index folder is on a read-only file system",
    errno.EACCES: "no permission to write in the index folder",
    errno.EPERM: "no permission to write in the index folder",
}
VERSION_BYTES_PER_IMAGE = 1024  # a metadata row (paths, hashes, locations) with its SQLite overhead
MARGIN_BYTES = 256 * 1024  # manifests, meta.json files, SQLite's journal, file system blocks


class DiskFull(IndexStoreError):
    """The disk cannot hold what a write needs. Its message names no path: it is shown to clients."""

    def __init__(self, free_bytes: int, needed_bytes: int | None = None) -> None:
        self.free_bytes, self.needed_bytes = free_bytes, needed_bytes
        message = f"disk full: {free_bytes / MIB:.1f} MiB free"
        if needed_bytes is not None:
            message += f", about {needed_bytes / MIB:.1f} MiB needed"
        super().__init__(message)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer can still use on the file system holding `path` (or the nearest
    folder above it that exists)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def stored_bytes_per_image(identity: EncodingIdentity) -> int:
    """A segment's bytes for one image: the local map (with int8's float16 scales) and the global vector."""
    h, w, channels = identity.local_shape
    scales = h * w * 2 if identity.local_dtype == "int8" else 0  # float16, one per position
    value_bytes = 1 if identity.local_dtype == "int8" else 2
    return h * w * channels * value_bytes + scales + identity.global_dim * 4


def build_bytes_needed(identity: EncodingIdentity, to_encode: int, total: int) -> int:
    """New segments for `to_encode` images, plus the new version's files for all `total` images (a flat
    global index holds every vector once more)."""
    segments = to_encode * stored_bytes_per_image(identity)
    version = total * (identity.global_dim * 4 + VERSION_BYTES_PER_IMAGE)
    return segments + version + MARGIN_BYTES


def check_room(path: Path, needed_bytes: int) -> None:
    """DiskFull when the file system holding `path` has less than `needed_bytes` free."""
    free = free_bytes(path)
    if free < needed_bytes:
        raise DiskFull(free, needed_bytes)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an error it was raised from, is a full disk (or an exhausted quota)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFull):
            return True
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return True
        if any(words in str(exc) for words in FULL_WORDS):  # FAISS and SQLite wrap the errno in words
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def storage_problem(exc: BaseException) -> str | None:
    """What a user should hear about a storage fault behind `exc` (no paths), or None if it is none."""
    if is_disk_full(exc):
        return str(exc) if isinstance(exc, DiskFull) else "disk full"
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NOT_WRITABLE:
            return NOT_WRITABLE[exc.errno]
        exc = exc.__cause__ or exc.__context__
    return None
