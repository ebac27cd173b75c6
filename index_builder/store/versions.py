"""Versions: what a search opens. Written aside, renamed into place, published by a pointer swap.

    INDEX_DIR/
      CURRENT                  the published version's name, replaced atomically
      versions/v000007/        manifest.json, global.faiss, meta.sqlite (+ shard-NN.* files when sharded)

A reader opens one version and keeps it (its files stay readable after they are unlinked).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import torch

from index_builder.calibration import Calibration, Locations, served_calibration, zone_ids
from index_builder.errors import IndexNotFound, IndexStoreError
from index_builder.global_index import read_global_index, write_global_index
from index_builder.manifest import MANIFEST_FILE, IndexManifest
from index_builder.sharding import ShardPlan, shard_key
from index_builder.store.codec import decode_local, decode_local_on
from index_builder.store.files import fsync_dir, fsync_file, fsync_tree, now_iso, sha256_file
from index_builder.store.location_shards import ShardRows, ids_file, read_shard_rows
from index_builder.store.metadata import (
    METADATA_FILE,
    ImageRecord,
    open_metadata,
    record_of,
    segment_column,
    write_metadata,
)
from index_builder.store.resident import ResidentCandidates, ResidentMaps
from index_builder.store.segments import TMP_PREFIX, SegmentFiles, segment_dir

CURRENT = "CURRENT"
VERSIONS = "versions"
GLOBAL_INDEX_FILE = "global.faiss"
RETIRED = ".retired"  # names of versions rolled back from
NO_INDEX_HINT = (
    "add reference photos with POST /index/images then POST /index/rebuild, or run `selavpr index build`"
)


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
    """Never a name used before: clients page through a version by its name."""
    names = [*version_names(index_dir), current_version_name(index_dir) or "", *retired_names(index_dir)]
    numbers = [int(n[1:]) for n in names if n[1:].isdigit()]
    return f"v{max(numbers, default=0) + 1:06d}"


def retire_versions(index_dir: Path, names: Sequence[str]) -> None:
    """Record published versions that were rolled back from (their folders go with the next build),
    so that their names are not given again."""
    with open(index_dir / VERSIONS / RETIRED, "a") as f:
        f.writelines(f"{name}\n" for name in names)
        f.flush()
        os.fsync(f.fileno())


def retired_names(index_dir: Path) -> list[str]:
    try:
        return (index_dir / VERSIONS / RETIRED).read_text().split()
    except FileNotFoundError:
        return []


def publish_version(
    index_dir: Path,
    records: Sequence[ImageRecord],
    global_index: faiss.Index,
    manifest: IndexManifest,
    write_extra: Callable[[Path], Sequence[str]] | None = None,
) -> IndexManifest:
    """Write a version aside, rename it into versions/, then swap CURRENT to it. Returns the manifest as
    published (with its version name, time and checksums). `write_extra` writes more files into the
    staging directory (a sharded version's location shards) and names them, to be checksummed too."""
    name = next_version_name(index_dir)
    versions = index_dir / VERSIONS
    staging = versions / f"{TMP_PREFIX}{name}"
    staging.mkdir(parents=True)
    write_global_index(global_index, staging / GLOBAL_INDEX_FILE)
    write_metadata(staging / METADATA_FILE, records)
    extra = list(write_extra(staging)) if write_extra else []
    files = {f: sha256_file(staging / f) for f in (GLOBAL_INDEX_FILE, METADATA_FILE, *extra)}
    manifest = replace(manifest, version=name, created_at=now_iso(), files=files)
    if manifest.report is not None:
        manifest.report.version = name
    manifest.write(staging / MANIFEST_FILE)
    fsync_tree(staging)
    staging.rename(versions / name)
    fsync_dir(versions)
    point_current(index_dir, name)
    return manifest


def point_current(index_dir: Path, name: str) -> None:
    """Make `name` the published version: CURRENT replaced atomically, durably."""
    pointer = index_dir / f"{CURRENT}.tmp"
    pointer.write_text(name + "\n")
    fsync_file(pointer)
    os.replace(pointer, index_dir / CURRENT)
    fsync_dir(index_dir)


class IndexVersion:
    """One published version, opened for searching. It stays usable while newer versions appear."""

    def __init__(
        self,
        index_dir: Path,
        name: str,
        load_global: bool = True,
        only_ids: np.ndarray | None = None,
        shard: int | None = None,
    ) -> None:
        """load_global=False leaves the version-wide global index unread (None): a location shard's
        server reads only its own, and a Ray router none. only_ids: the images whose local maps this
        reader expects to read (the Ray ingress: none, an empty array); only their rows of the id map
        are read at opening, and only the segment files they are in are opened; another image's row
        (and file) is looked up when it is first read. Default: all, at opening.
        shard: a reader for location shard `shard`'s server, which reads only that shard's maps: its own
        id table and segments (store/location_shards.py), never meta.sqlite, when the shard owns its
        files; in a version written before shards did, only_ids = its ids, from meta.sqlite. Such a
        reader has no image records (`records`, `locations`: the ingress answers with those)."""
        self.index_dir, self.name = index_dir, name
        self.dir = index_dir / VERSIONS / name
        self.manifest = IndexManifest.read(self.dir)
        self.identity = self.manifest.encoding
        try:
            self.index = (
                read_global_index(self.dir / GLOBAL_INDEX_FILE, self.manifest.global_index)
                if load_global
                else None
            )
            own = self._own_rows(shard)
            if own is None and shard is not None:
                only_ids = self._shard_ids(shard)
            self.db = None if own is not None else open_metadata(self.dir / METADATA_FILE)
            if own is not None:
                count, ids, locations = self.manifest.count, np.zeros(0, np.int64), []
                self.segment_names = list(own.segments)
            else:
                count, ids, locations = _read_locations(self.db, only_ids)
                self.segment_names = sorted({segment for segment, _ in locations})
            segments = [SegmentFiles(segment_dir(index_dir, s)) for s in self.segment_names]
        except (RuntimeError, sqlite3.Error, OSError, ValueError) as exc:  # faiss raises RuntimeError
            raise IndexStoreError(
                f"version {name} is damaged ({type(exc).__name__}); rebuild the index"
            ) from None
        # id -> (segment, row): 8 bytes per image, all a search needs to find an image's local features;
        # -1 for an image not looked up yet (only_ids) or of another shard
        self.id_segment = np.full(count, -1, dtype=np.int32)
        self.id_row = np.full(count, -1, dtype=np.int32)
        self.segments = segments
        self._segment_index = {s: i for i, s in enumerate(self.segment_names)}
        if own is not None:
            self.id_segment[own.ids], self.id_row[own.ids] = own.segment, own.row
        else:
            self._place(ids, locations)
        self._looking_up = threading.Lock()
        self.resident: ResidentMaps | None = None  # make_resident: the local maps in a GPU's memory
        self.calibration: Calibration | None
        self.calibration, self.calibration_note = served_calibration(
            index_dir, self.manifest.calibration, self.identity.fingerprint, self.manifest.calibration_note
        )
        self._locations: Locations | None = None
        # a version dropped without close() (a server swapping in a newer one) still releases its files
        self._finalizer = weakref.finalize(self, _close_version, self.segments, self.db)

    @classmethod
    def open_current(cls, index_dir: str | os.PathLike, load_global: bool = True) -> IndexVersion:
        index_dir = Path(index_dir)
        name = current_version_name(index_dir)
        if name is None:
            raise IndexNotFound(f"no published index yet ({NO_INDEX_HINT})")
        return cls(index_dir, name, load_global)

    def _own_rows(self, shard: int | None) -> ShardRows | None:
        """The id table of location shard `shard` when it owns its files; None otherwise."""
        if shard is None:
            return None
        plan = self._shard_plan(shard)
        return read_shard_rows(self.dir, plan, self.manifest.count) if plan.owns_files else None

    def _shard_ids(self, shard: int) -> np.ndarray:
        """Location shard `shard`'s ids, in a version whose shards share its segments."""
        try:
            return np.load(self.dir / ids_file(self._shard_plan(shard).key), allow_pickle=False)
        except (OSError, ValueError):
            raise IndexStoreError(f"{self.name}: location shard {shard_key(shard)} is damaged") from None

    def _shard_plan(self, shard: int) -> ShardPlan:
        shards = self.manifest.location_shards
        if not 0 <= shard < len(shards):
            raise IndexStoreError(f"{self.name} has {len(shards)} location shards, not {shard_key(shard)}")
        return shards[shard]

    def __len__(self) -> int:
        return len(self.id_row)

    def _metadata(self) -> sqlite3.Connection:
        """The version-wide metadata; a location shard's own reader has none."""
        if self.db is None:
            raise IndexStoreError(f"{self.name}: a location shard's reader has no image records")
        return self.db

    def records(self, ids: Sequence[int]) -> list[ImageRecord]:
        if not len(ids):
            return []
        marks = ", ".join("?" * len(ids))
        rows = (
            self._metadata()
            .execute(f"SELECT * FROM images WHERE id IN ({marks})", [int(i) for i in ids])
            .fetchall()
        )
        by_id = {r["id"]: record_of(r) for r in rows}
        return [by_id[int(i)] for i in ids]

    @property
    def locations(self) -> Locations:
        """Every reference's UTM location by id (24 bytes each), read once: the answer's probability
        looks at where all the re-ranked candidates are."""
        if self._locations is None:
            query = "SELECT utm_east, utm_north, utm_zone FROM images ORDER BY id"
            rows = self._metadata().execute(query).fetchall()
            east = np.array([np.nan if r[0] is None else r[0] for r in rows], dtype=np.float64)
            north = np.array([np.nan if r[1] is None else r[1] for r in rows], dtype=np.float64)
            zone, zone_of = zone_ids([(r[2] or "") if r[0] is not None else None for r in rows])
            self._locations = Locations(east, north, zone, zone_of)
        return self._locations

    def all_records(self) -> list[ImageRecord]:
        return [record_of(r) for r in self._metadata().execute("SELECT * FROM images ORDER BY id")]

    def candidate_maps(
        self, ids: Sequence[int], device: torch.device | None = None
    ) -> StoredMaps | ResidentCandidates:
        """These images' maps for the matcher, decoded on `device` (default CPU) a chunk at a time; from
        device memory where make_resident put them there."""
        device = device or torch.device("cpu")
        if self.resident is not None and self.resident.device == device:
            return self.resident.candidates(ids)
        return StoredMaps(self, [int(i) for i in ids], device)

    def make_resident(self, device: torch.device, ids: np.ndarray | None = None) -> None:
        """Copy the stored local arrays of these images (default: all; a location shard's server: its
        own) to `device` (see resident.py); torch.OutOfMemoryError if they do not fit, the version then
        reading from the store as before."""
        held = np.arange(len(self), dtype=np.int64) if ids is None else ids
        self.resident = ResidentMaps(self.read_stored, held, self.identity.local_shape, device)

    def stored_local_bytes(self, count: int | None = None) -> int:
        """Bytes of the stored local arrays (values and scales) of all images, or of `count` of them."""
        if not self.segments:
            return 0
        h, w, channels = self.identity.local_shape
        segment = self.segments[0]
        per_image = h * w * channels * segment.local.dtype.itemsize
        if segment.scale is not None:
            per_image += h * w * segment.scale.dtype.itemsize
        return per_image * (len(self) if count is None else count)

    def read_stored(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """The stored local arrays of these images (values, scales or None), in the given order."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (self.id_segment[ids] < 0).any():
            self._look_up(ids)
        first = self.segments[0] if self.segments else None
        values = np.empty(
            (len(ids), *self.identity.local_shape), dtype=first.local.dtype if first else np.float32
        )
        scales = None
        if first is not None and first.scale is not None:
            scales = np.empty((len(ids), *self.identity.local_shape[:-1]), dtype=first.scale.dtype)
        for segment in np.unique(self.id_segment[ids]):
            where = np.nonzero(self.id_segment[ids] == segment)[0]
            v, s = self.segments[segment].read_stored(self.id_row[ids[where]])
            values[where] = v
            if scales is not None:
                scales[where] = s
        return values, scales

    def _place(self, ids: np.ndarray, locations: list[tuple[str, int]]) -> None:
        """Fill the id map for these ids, opening the segment files not open yet."""
        for segment, _ in locations:
            if segment not in self._segment_index:
                self.segments.append(SegmentFiles(segment_dir(self.index_dir, segment)))
                self.segment_names.append(segment)
                self._segment_index[segment] = len(self.segments) - 1
        self.id_row[ids] = [row for _, row in locations]
        self.id_segment[ids] = [self._segment_index[segment] for segment, _ in locations]

    def _look_up(self, ids: np.ndarray) -> None:
        """Rows of the id map not read at opening (only_ids), read now from meta.sqlite; a location
        shard's own reader holds only its references (IndexStoreError for another's)."""
        with self._looking_up:
            missing = np.unique(ids[self.id_segment[ids] < 0])
            if len(missing) and self.db is None:
                not_here = int(missing[0])
                raise IndexStoreError(f"{self.name}: reference {not_here} is not in this location shard")
            if len(missing):
                try:
                    self._place(missing, _locations_of(self.db, missing))
                except (sqlite3.Error, OSError, ValueError) as exc:
                    raise IndexStoreError(f"version {self.name} is damaged ({type(exc).__name__})") from None

    def read_local(self, ids: Sequence[int]) -> np.ndarray:
        """Local maps of these images, float32 (k, h, w, C), in the given order."""
        return decode_local(*self.read_stored(ids))

    def close(self) -> None:
        self.resident = None  # device memory goes back now, not when the object is collected
        self._finalizer()


# ids per query when reading part of the id map (below SQLite's limit on bound parameters)
ID_CHUNK = 10_000


def _read_locations(
    db: sqlite3.Connection, only_ids: np.ndarray | None
) -> tuple[int, np.ndarray, list[tuple[str, int]]]:
    """(images in the version, ids read, their (segment, row)): all ids in order, or only_ids' rows
    looked up by id (a shard of 250,000 in a 1 M index: its own rows, not the whole table)."""
    if only_ids is None:
        column = segment_column(db)
        rows = db.execute(f"SELECT {column} AS segment, row FROM images ORDER BY id").fetchall()
        return len(rows), np.arange(len(rows)), [(r["segment"], r["row"]) for r in rows]
    largest = db.execute("SELECT MAX(id) FROM images").fetchone()[0]
    count = 0 if largest is None else largest + 1  # ids are 0..n-1
    ids = np.unique(np.asarray(only_ids, dtype=np.int64))
    return count, ids, _locations_of(db, ids)


def _locations_of(db: sqlite3.Connection, ids: np.ndarray) -> list[tuple[str, int]]:
    """(segment, row) of each of these ids, in their order."""
    column = segment_column(db)
    found: dict[int, tuple[str, int]] = {}
    for start in range(0, len(ids), ID_CHUNK):
        chunk = ids[start : start + ID_CHUNK].tolist()
        marks = ", ".join("?" * len(chunk))
        query = f"SELECT id, {column} AS segment, row FROM images WHERE id IN ({marks})"
        found.update((r["id"], (r["segment"], r["row"])) for r in db.execute(query, chunk))
    if len(found) != len(set(ids.tolist())):
        raise ValueError("ids missing from the version's metadata")
    return [found[i] for i in ids.tolist()]


def _close_version(segments: list[SegmentFiles], db: sqlite3.Connection | None) -> None:
    for segment in segments:
        segment.close()
    if db is not None:
        db.close()


class StoredMaps:
    """CandidateMaps over stored images: the matcher decodes them a chunk at a time. The stored (compact)
    arrays of each chunk are kept, so that a second pass over some candidates (the float32 recount)
    decodes them again without reading the disk twice; about 0.46 MiB per 61x61x128 int8 candidate."""

    def __init__(self, version: IndexVersion, ids: list[int], device: torch.device) -> None:
        self.version, self.ids, self.device = version, ids, device
        self._stored: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def map_shape(self) -> tuple[int, int, int]:
        return self.version.identity.local_shape

    def load(self, indices: slice | Sequence[int]) -> torch.Tensor:
        positions = list(range(len(self.ids))[indices] if isinstance(indices, slice) else indices)
        if not positions:
            return torch.zeros((0, *self.map_shape), dtype=torch.float32, device=self.device)
        missing = [p for p in positions if p not in self._stored]
        if missing:
            values, scales = self.version.read_stored([self.ids[p] for p in missing])
            for i, p in enumerate(missing):
                self._stored[p] = (values[i], scales[i] if scales is not None else None)
        values = np.stack([self._stored[p][0] for p in positions])
        has_scale = self._stored[positions[0]][1] is not None
        scales = np.stack([self._stored[p][1] for p in positions]) if has_scale else None
        return decode_local_on(values, scales, self.device)
