"""Feature segments: immutable directories of encoded images, shared by every version that uses them.

    segments/g-<id>/  meta.json, global.npy (N, D) float32, local.npy, scale.npy (int8 only)

A segment is written into `segments/.tmp-<id>/` and renamed into place when complete, so a segment
directory either is whole or does not exist. A segment left by a killed build is reused by the next one
through the content hashes in its meta.json.

Indexes written before segments had their name keep them in `shards/s-<id>/`; a segment's name says
which of the two folders holds it (`segment_dir`), so old versions open and their features are reused.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index_builder.errors import IndexStoreError
from index_builder.manifest import FORMAT, EncodingIdentity, SegmentEntry
from index_builder.store.codec import decode_local
from index_builder.store.files import fsync_dir, fsync_tree, sha256_file, write_json

SEGMENTS = "segments"
LEGACY_SEGMENTS = "shards"  # the folder of segments written before the rename ("s-" names)
SEGMENT_FOLDERS = (SEGMENTS, LEGACY_SEGMENTS)
_LEGACY_PREFIX = "s-"
TMP_PREFIX = ".tmp-"
META_FILE = "meta.json"
SEGMENT_FORMAT_VERSION = 2  # a segment's meta.json has not changed since the manifest's format 2


def segment_dir(index_dir: Path, name: str) -> Path:
    """Where the segment called `name` lives in an index directory."""
    folder = LEGACY_SEGMENTS if name.startswith(_LEGACY_PREFIX) else SEGMENTS
    return index_dir / folder / name


@dataclass
class SegmentImage:
    content_hash: str
    width: int
    height: int
    exif_location: dict[str, Any] | None


@dataclass
class SegmentMeta:
    encoding: EncodingIdentity
    images: list[SegmentImage]
    files: dict[str, str]

    def entry(self, name: str) -> SegmentEntry:
        return SegmentEntry(name=name, count=len(self.images), files=dict(self.files))


def write_segment(
    segments_dir: Path,
    identity: EncodingIdentity,
    images: Sequence[SegmentImage],
    arrays: dict[str, np.ndarray],
) -> str:
    """Write one segment (arrays: `global` and the `encode_local` output) aside, then rename it into
    place. Returns its name."""
    name = f"g-{uuid.uuid4().hex[:16]}"
    staging = segments_dir / f"{TMP_PREFIX}{name}"
    staging.mkdir(parents=True)
    files = {}
    for key, array in arrays.items():
        path = staging / f"{key}.npy"
        np.save(path, array)
        files[path.name] = sha256_file(path)
    meta = {
        "format": FORMAT,
        "format_version": SEGMENT_FORMAT_VERSION,
        "encoding": identity.to_dict(),
        "count": len(images),
        "images": [asdict(image) for image in images],
        "files": files,
    }
    write_json(staging / META_FILE, meta)
    fsync_tree(staging)
    staging.rename(segments_dir / name)
    fsync_dir(segments_dir)
    return name


def read_segment_meta(segment_dir: Path) -> SegmentMeta | None:
    """A complete segment's description; None for anything unreadable (it is then neither reused nor
    trusted)."""
    try:
        data = json.loads((segment_dir / META_FILE).read_text())
        return SegmentMeta(
            encoding=EncodingIdentity.from_dict(data["encoding"]),
            images=[SegmentImage(**image) for image in data["images"]],
            files=dict(data["files"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


class SegmentFiles:
    """One segment's arrays, read row by row with pread: nothing is mapped into the process, so resident
    memory does not grow with the rows a server has touched."""

    def __init__(self, segment_dir: Path) -> None:
        self.dir = segment_dir
        self.local = NpyRows(segment_dir / "local.npy")
        scale = segment_dir / "scale.npy"
        self.scale = NpyRows(scale) if scale.exists() else None

    def read_stored(self, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """The stored local arrays of these rows, as on disk (values, and scales for int8)."""
        return self.local.read(rows), self.scale.read(rows) if self.scale else None

    def read_local(self, rows: Sequence[int]) -> np.ndarray:
        return decode_local(*self.read_stored(rows))

    def read_global(self) -> np.ndarray:
        return np.load(self.dir / "global.npy")

    def close(self) -> None:
        self.local.close()
        if self.scale:
            self.scale.close()


class NpyRows:
    """Rows of a .npy file, read with pread."""

    def __init__(self, path: Path) -> None:
        header = np.load(path, mmap_mode="r")  # parses the header only; the mapping is dropped below
        self.dtype, self.row_shape, self.offset = header.dtype, header.shape[1:], header.offset
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        del header
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, rows: Sequence[int]) -> np.ndarray:
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        for i, row in enumerate(rows):
            data = os.pread(self.fd, self.row_bytes, self.offset + int(row) * self.row_bytes)
            if len(data) != self.row_bytes:
                raise IndexStoreError(f"segment file truncated at row {row}")
            flat[i] = np.frombuffer(data, dtype=np.uint8)
        return out

    def close(self) -> None:
        os.close(self.fd)
