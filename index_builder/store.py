"""The index on disk: immutable feature shards shared by versions, versions published by a pointer swap.

    INDEX_DIR/
      CURRENT                  the published version's name, replaced atomically
      versions/v000007/        manifest.json, global.faiss, meta.sqlite
      shards/s-<id>/           meta.json, global.npy (N, D) float32, local.npy, scale.npy
      .build.lock              held by the one build running

A shard is written into `shards/.tmp-<id>/` and renamed into place when complete, so a shard directory
either is whole or does not exist. Versions are written aside the same way; publishing replaces CURRENT.
A reader opens one version and keeps it (its files stay readable after they are unlinked). Shards are
immutable and shared: a new version references the shards of reused images, and a shard left by a killed
build is reused by the next one through the content hashes in its meta.json.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import sqlite3
import time
import uuid
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from index_builder.global_index import GlobalIndexConfig, read_global_index, write_global_index
from model.errors import SelavprError

FORMAT = "selavpr-index"
FORMAT_VERSION = 1
CURRENT = "CURRENT"
VERSIONS = "versions"
SHARDS = "shards"
LOCK = ".build.lock"
TMP_PREFIX = ".tmp-"
LOCAL_DTYPES = ("int8", "float16")
DEFAULT_LOCAL_DTYPE = "int8"  # 0.46 MiB per 61x61x128 map, see README "Local feature storage"


class IndexStoreError(SelavprError):
    """An index problem a user can act on."""


class IndexNotFound(IndexStoreError):
    pass


class BuildInProgress(IndexStoreError):
    pass


# --- what the features were computed with ------------------------------------------------------------


@dataclass(frozen=True)
class EncodingIdentity:
    """Everything that determines stored features. Shards of another identity are never reused."""

    fingerprint: str
    local_mode: str
    image_size: int
    exif_transpose: bool
    local_dtype: str
    global_dim: int
    local_shape: tuple[int, int, int]
    model_dtype: str = "float32"  # the forward's dtype; manifests from before it was recorded: float32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncodingIdentity:
        return cls(**{**data, "local_shape": tuple(data["local_shape"])})


# --- compact local features --------------------------------------------------------------------------


def encode_local(local: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """(n, h, w, C) float32 unit vectors -> stored arrays. int8: each position scaled by its own largest
    component (kept as float16), so every position uses the full int8 range."""
    if dtype == "float16":
        return {"local": local.astype(np.float16)}
    scale = np.abs(local).max(axis=-1).astype(np.float16)
    safe = np.where(scale > 0, scale.astype(np.float32), 1.0)[..., None]
    values = np.clip(np.rint(local / safe * 127), -127, 127).astype(np.int8)
    return {"local": values, "scale": scale}


def decode_local(values: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Stored arrays -> float32 maps, each position renormalised to unit length as the original was:
    rounding changes lengths a little, and a longer candidate vector would win argmaxes it should not
    (it cuts the count error by a third, measured in README "Reference index")."""
    decoded = values.astype(np.float32)
    if scale is not None:
        decoded *= scale.astype(np.float32)[..., None] / 127
    norms = np.linalg.norm(decoded, axis=-1, keepdims=True)
    return np.divide(decoded, norms, out=np.zeros_like(decoded), where=norms > 0)


# --- shards ------------------------------------------------------------------------------------------


@dataclass
class ShardImage:
    content_hash: str
    width: int
    height: int
    exif_location: dict[str, Any] | None


def write_shard(
    shards_dir: Path,
    identity: EncodingIdentity,
    images: Sequence[ShardImage],
    arrays: dict[str, np.ndarray],
) -> str:
    """Write one shard (arrays: `global` and the `encode_local` output) aside, then rename it into
    place. Returns its name."""
    name = f"s-{uuid.uuid4().hex[:16]}"
    staging = shards_dir / f"{TMP_PREFIX}{name}"
    staging.mkdir(parents=True)
    files = {}
    for key, array in arrays.items():
        path = staging / f"{key}.npy"
        np.save(path, array)
        files[path.name] = sha256_file(path)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoding": identity.to_dict(),
        "count": len(images),
        "images": [asdict(image) for image in images],
        "files": files,
    }
    _write_json(staging / "meta.json", meta)
    _fsync_tree(staging)
    staging.rename(shards_dir / name)
    _fsync_dir(shards_dir)
    return name


def read_shard_meta(shard_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((shard_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None


class ShardFiles:
    """One shard's arrays, read row by row with pread: nothing is mapped into the process, so resident
    memory does not grow with the rows a server has touched."""

    def __init__(self, shard_dir: Path) -> None:
        self.dir = shard_dir
        self.local = _NpyRows(shard_dir / "local.npy")
        scale = shard_dir / "scale.npy"
        self.scale = _NpyRows(scale) if scale.exists() else None

    def read_local(self, rows: Sequence[int]) -> np.ndarray:
        values = self.local.read(rows)
        return decode_local(values, self.scale.read(rows) if self.scale else None)

    def read_global(self) -> np.ndarray:
        return np.load(self.dir / "global.npy")

    def close(self) -> None:
        self.local.close()
        if self.scale:
            self.scale.close()


class _NpyRows:
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
                raise IndexStoreError(f"shard file truncated at row {row}")
            flat[i] = np.frombuffer(data, dtype=np.uint8)
        return out

    def close(self) -> None:
        os.close(self.fd)


# --- metadata ----------------------------------------------------------------------------------------


@dataclass
class ImageRecord:
    id: int
    path: str
    content_hash: str
    file_size: int
    mtime_ns: int
    width: int
    height: int
    lat: float | None
    lon: float | None
    utm_east: float | None
    utm_north: float | None
    utm_zone: str | None
    location_source: str | None
    exif_location: str | None  # JSON; kept so that unchanged images keep it without being reopened
    added_at: str
    shard: str
    row: int


_COLUMNS = [f.name for f in fields(ImageRecord)]
_SCHEMA = """
CREATE TABLE images (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, content_hash TEXT NOT NULL,
    file_size INTEGER, mtime_ns INTEGER, width INTEGER, height INTEGER,
    lat REAL, lon REAL, utm_east REAL, utm_north REAL, utm_zone TEXT, location_source TEXT,
    exif_location TEXT, added_at TEXT NOT NULL, shard TEXT NOT NULL, row INTEGER NOT NULL
);
CREATE INDEX images_hash ON images (content_hash);
"""


def write_metadata(path: Path, records: Iterable[ImageRecord]) -> None:
    db = sqlite3.connect(path)
    try:
        db.executescript(_SCHEMA)
        placeholders = ", ".join("?" * len(_COLUMNS))
        db.executemany(
            f"INSERT INTO images ({', '.join(_COLUMNS)}) VALUES ({placeholders})",
            (tuple(getattr(r, c) for c in _COLUMNS) for r in records),
        )
        db.commit()
    finally:
        db.close()


def _open_metadata(path: Path) -> sqlite3.Connection:
    # immutable: the file never changes once published, so readers need no locks
    db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
    db.row_factory = sqlite3.Row
    return db


# --- versions ----------------------------------------------------------------------------------------


def current_version_name(index_dir: Path) -> str | None:
    try:
        name = (index_dir / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def version_names(index_dir: Path) -> list[str]:
    root = index_dir / VERSIONS
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name.startswith("v") and p.is_dir())


def next_version_name(index_dir: Path) -> str:
    existing = [int(n[1:]) for n in version_names(index_dir) if n[1:].isdigit()]
    current = current_version_name(index_dir)
    if current and current[1:].isdigit():
        existing.append(int(current[1:]))
    return f"v{max(existing, default=0) + 1:06d}"


def publish_version(
    index_dir: Path,
    records: Sequence[ImageRecord],
    global_index: faiss.Index,
    manifest: dict[str, Any],
) -> str:
    """Write a version aside, rename it into versions/, then swap CURRENT to it."""
    name = next_version_name(index_dir)
    versions = index_dir / VERSIONS
    staging = versions / f"{TMP_PREFIX}{name}"
    staging.mkdir(parents=True)
    write_global_index(global_index, staging / "global.faiss")
    write_metadata(staging / "meta.sqlite", records)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": name,
        "created_at": now_iso(),
        **manifest,
        "files": {f: sha256_file(staging / f) for f in ("global.faiss", "meta.sqlite")},
    }
    _write_json(staging / "manifest.json", manifest)
    _fsync_tree(staging)
    staging.rename(versions / name)
    _fsync_dir(versions)
    pointer = index_dir / f"{CURRENT}.tmp"
    pointer.write_text(name + "\n")
    _fsync_file(pointer)
    os.replace(pointer, index_dir / CURRENT)
    _fsync_dir(index_dir)
    return name


class IndexVersion:
    """One published version, opened for searching. It stays usable while newer versions appear."""

    def __init__(self, index_dir: Path, name: str) -> None:
        self.index_dir, self.name = index_dir, name
        self.dir = index_dir / VERSIONS / name
        try:
            self.manifest = json.loads((self.dir / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise IndexNotFound(f"{self.dir}: unreadable manifest ({exc})") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version", 0) > FORMAT_VERSION:
            raise IndexNotFound(f"{self.dir}: not a {FORMAT} version this release can read")
        self.identity = EncodingIdentity.from_dict(self.manifest["encoding"])
        self.global_config = GlobalIndexConfig(**self.manifest["global_index"])
        self.index = read_global_index(self.dir / "global.faiss", self.global_config)
        self.db = _open_metadata(self.dir / "meta.sqlite")
        locations = self.db.execute("SELECT shard, row FROM images ORDER BY id").fetchall()
        self.shard_names = sorted({r["shard"] for r in locations})
        shard_index = {s: i for i, s in enumerate(self.shard_names)}
        # id -> (shard, row): 8 bytes per image, all a search needs to find an image's local features
        self.id_shard = np.array([shard_index[r["shard"]] for r in locations], dtype=np.int32)
        self.id_row = np.array([r["row"] for r in locations], dtype=np.int32)
        self.shards = [ShardFiles(index_dir / SHARDS / s) for s in self.shard_names]
        # a version dropped without close() (a server swapping in a newer one) still releases its files
        self._finalizer = weakref.finalize(self, _close_version, self.shards, self.db)

    @classmethod
    def open_current(cls, index_dir: str | os.PathLike) -> IndexVersion:
        index_dir = Path(index_dir)
        name = current_version_name(index_dir)
        if name is None:
            raise IndexNotFound(f"{index_dir}: no published index (run `selavpr index build`)")
        return cls(index_dir, name)

    def __len__(self) -> int:
        return len(self.id_row)

    def records(self, ids: Sequence[int]) -> list[ImageRecord]:
        if not len(ids):
            return []
        marks = ", ".join("?" * len(ids))
        rows = self.db.execute(
            f"SELECT * FROM images WHERE id IN ({marks})", [int(i) for i in ids]
        ).fetchall()
        by_id = {r["id"]: ImageRecord(**dict(r)) for r in rows}
        return [by_id[int(i)] for i in ids]

    def all_records(self) -> list[ImageRecord]:
        return [ImageRecord(**dict(r)) for r in self.db.execute("SELECT * FROM images ORDER BY id")]

    def candidate_maps(self, ids: Sequence[int]) -> StoredMaps:
        return StoredMaps(self, [int(i) for i in ids])

    def read_local(self, ids: Sequence[int]) -> np.ndarray:
        """Local maps of these images, float32 (k, h, w, C), in the given order."""
        out = np.empty((len(ids), *self.identity.local_shape), dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        for shard in np.unique(self.id_shard[ids]):
            where = np.nonzero(self.id_shard[ids] == shard)[0]
            out[where] = self.shards[shard].read_local(self.id_row[ids[where]])
        return out

    def close(self) -> None:
        self._finalizer()


def _close_version(shards: list[ShardFiles], db: sqlite3.Connection) -> None:
    for shard in shards:
        shard.close()
    db.close()


class StoredMaps:
    """CandidateMaps over stored images: the matcher decodes them a chunk at a time."""

    def __init__(self, version: IndexVersion, ids: list[int]) -> None:
        self.version, self.ids = version, ids

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def map_shape(self) -> tuple[int, int, int]:
        return self.version.identity.local_shape

    def load(self, indices: slice | Sequence[int]) -> torch.Tensor:
        picked = self.ids[indices] if isinstance(indices, slice) else [self.ids[i] for i in indices]
        return torch.from_numpy(self.version.read_local(picked))


# --- one build at a time, and cleaning up ------------------------------------------------------------


class BuildLock:
    """An exclusive lock on INDEX_DIR/.build.lock, released when the process ends however it ends."""

    def __init__(self, index_dir: Path) -> None:
        self.path = index_dir / LOCK
        self.fd: int | None = None

    RETRY_SECONDS = 1.0  # a status probe holds the lock shared for microseconds

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
                    raise BuildInProgress(f"{self.path.parent}: another build is running") from None
                time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def remove_unfinished(index_dir: Path) -> None:
    """After a crash: staging directories, and versions written but never published. Needs the lock."""
    for parent in (index_dir / SHARDS, index_dir / VERSIONS):
        if parent.is_dir():
            for entry in parent.iterdir():
                if entry.name.startswith(TMP_PREFIX):
                    shutil.rmtree(entry, ignore_errors=True)
    current = current_version_name(index_dir)
    for name in version_names(index_dir):
        if current is None or name > current:
            shutil.rmtree(index_dir / VERSIONS / name, ignore_errors=True)
    (index_dir / f"{CURRENT}.tmp").unlink(missing_ok=True)


def collect_garbage(index_dir: Path, grace_seconds: float) -> dict[str, list[str]]:
    """Drop versions superseded more than grace_seconds ago, then shards no remaining version uses.
    Needs the lock. Readers that opened a dropped version keep working: open files outlive unlinking."""
    current = current_version_name(index_dir)
    names = version_names(index_dir)
    removed_versions = []
    for older, newer in itertools.pairwise(names):
        superseded_at = _created_at(index_dir / VERSIONS / newer)
        if older != current and time.time() - superseded_at > grace_seconds:
            shutil.rmtree(index_dir / VERSIONS / older, ignore_errors=True)
            removed_versions.append(older)
    kept_shards: set[str] = set()
    for name in version_names(index_dir):
        manifest = json.loads((index_dir / VERSIONS / name / "manifest.json").read_text())
        kept_shards |= {s["name"] for s in manifest["shards"]}
    removed_shards = []
    shards_dir = index_dir / SHARDS
    if shards_dir.is_dir():
        for entry in shards_dir.iterdir():
            if not entry.name.startswith(TMP_PREFIX) and entry.name not in kept_shards:
                shutil.rmtree(entry, ignore_errors=True)
                removed_shards.append(entry.name)
    return {"versions": removed_versions, "shards": removed_shards}


def _created_at(version_dir: Path) -> float:
    try:
        created = json.loads((version_dir / "manifest.json").read_text())["created_at"]
        return dt.datetime.fromisoformat(created).timestamp()
    except (OSError, ValueError, KeyError):
        return version_dir.stat().st_mtime


# --- small file helpers --------------------------------------------------------------------------------


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_file(path)


def _fsync_tree(root: Path) -> None:
    for path in root.iterdir():
        if path.is_file():
            _fsync_file(path)
    _fsync_dir(root)
