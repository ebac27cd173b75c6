"""Per-image metadata of a version: one immutable SQLite table."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

METADATA_FILE = "meta.sqlite"
LEGACY_SEGMENT_COLUMN = "shard"  # the `segment` column of versions written before the rename


@dataclass
class ImageRecord:
    id: int
    path: str  # relative to the references folder
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
    segment: str  # the feature segment holding its features, at `row`
    row: int
    name: str | None = None  # display name: the uploaded file's own name, else None (use `path`)

    @property
    def display_name(self) -> str:
        return self.name or self.path.rsplit("/", 1)[-1]


COLUMNS = [f.name for f in fields(ImageRecord)]
_SCHEMA = """
CREATE TABLE images (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, content_hash TEXT NOT NULL,
    file_size INTEGER, mtime_ns INTEGER, width INTEGER, height INTEGER,
    lat REAL, lon REAL, utm_east REAL, utm_north REAL, utm_zone TEXT, location_source TEXT,
    exif_location TEXT, added_at TEXT NOT NULL, segment TEXT NOT NULL, row INTEGER NOT NULL, name TEXT
);
CREATE INDEX images_hash ON images (content_hash);
"""


def write_metadata(path: Path, records: Iterable[ImageRecord]) -> None:
    db = sqlite3.connect(path)
    try:
        db.executescript(_SCHEMA)
        placeholders = ", ".join("?" * len(COLUMNS))
        db.executemany(
            f"INSERT INTO images ({', '.join(COLUMNS)}) VALUES ({placeholders})",
            (tuple(getattr(r, c) for c in COLUMNS) for r in records),
        )
        db.commit()
    finally:
        db.close()


def open_metadata(path: Path) -> sqlite3.Connection:
    # immutable: the file never changes once published, so readers need no locks
    db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
    db.row_factory = sqlite3.Row
    return db


def record_of(row: sqlite3.Row) -> ImageRecord:
    """A row -> a record; versions written before a column existed read it as None."""
    data = dict(row)
    if LEGACY_SEGMENT_COLUMN in data:
        data["segment"] = data.pop(LEGACY_SEGMENT_COLUMN)
    return ImageRecord(**{c: data.get(c) for c in COLUMNS})


def segment_column(db: sqlite3.Connection) -> str:
    """The column naming each image's segment: `segment`, or `shard` in versions from before the rename."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(images)")}
    return LEGACY_SEGMENT_COLUMN if LEGACY_SEGMENT_COLUMN in columns else "segment"
