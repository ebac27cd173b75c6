"""Storing uploaded reference images: checked first, named by the server, written atomically."""

from __future__ import annotations

import datetime as dt
import io
import os
import tempfile
import unicodedata
import uuid
from pathlib import Path

from PIL import Image

from app.errors import ApiError
from index_builder.locations import LOCATIONS_CSV, append_location_row
from index_builder.store.files import fsync_dir, fsync_file
from model.preprocess import open_rgb

UPLOADS = "uploads"
SUFFIX_BY_FORMAT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "HEIF": ".heic", "AVIF": ".avif"}
MAX_NAME_CHARS = 200


def check_reference(data: bytes, max_pixels: int) -> str:
    """Decode fully (a bad image raises ImageDecodeError) and return the file suffix to store it under."""
    open_rgb(data, exif_transpose=False, max_pixels=max_pixels, name="upload")
    with Image.open(io.BytesIO(data)) as image:
        suffix = SUFFIX_BY_FORMAT.get(image.format or "")
    if suffix is None:
        accepted = ", ".join(sorted(SUFFIX_BY_FORMAT))
        raise ApiError(415, "unsupported_media_type", f"reference images must be one of {accepted}")
    return suffix


def display_name(filename: str | None) -> str | None:
    """The uploaded file's own name as a label: its last path component, control characters removed,
    at most MAX_NAME_CHARS. Only ever shown, never used as a path."""
    if not filename:
        return None
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(c for c in base if unicodedata.category(c)[0] != "C").strip()
    return cleaned[:MAX_NAME_CHARS] or None


def write_reference(
    references: Path,
    data: bytes,
    suffix: str,
    location: tuple[float, float] | None,
    name: str | None = None,
) -> dict:
    """Write under references/uploads/<date>/<uuid><suffix> (never the upload's own name); the location
    and display name go into uploads/locations.csv."""
    rel = f"{dt.datetime.now(dt.UTC):%Y%m%d}/{uuid.uuid4().hex}{suffix}"
    target = references / UPLOADS / rel
    _make_dirs_durably(target.parent)
    _write_atomically(target, data)
    if location is not None or name:
        append_location_row(references / UPLOADS / LOCATIONS_CSV, rel, location, name)
    lat, lon = location if location else (None, None)
    return {"name": name or target.name, "path": f"{UPLOADS}/{rel}", "lat": lat, "lon": lon}


def write_references(
    references: Path, batch: list[tuple[bytes, str, tuple[float, float] | None, str | None]]
) -> list[dict]:
    """Every (data, suffix, location, name) or none: when one fails, the files already written are
    removed and the locations file is put back as it was, so a retry does not duplicate them."""
    csv = references / UPLOADS / LOCATIONS_CSV
    csv_before = csv.read_bytes() if csv.exists() else None
    stored: list[dict] = []
    try:
        for data, suffix, location, name in batch:
            stored.append(write_reference(references, data, suffix, location, name))
    except BaseException:
        for entry in stored:
            (references / entry["path"]).unlink(missing_ok=True)
        _restore(csv, csv_before)
        raise
    return stored


def _restore(csv: Path, before: bytes | None) -> None:
    """The locations file as it was. Rows are only ever appended, so cutting it back to its old length
    restores it without needing disk space (it may be full: that is often why we are here)."""
    if before is None:
        csv.unlink(missing_ok=True)
        return
    if csv.exists() and csv.read_bytes().startswith(before):
        os.truncate(csv, len(before))
        fsync_file(csv)
    else:  # its header was rewritten
        _write_atomically(csv, before)


def _make_dirs_durably(folder: Path) -> None:
    """mkdir -p, each new folder's entry flushed in its parent: a file acknowledged inside it must not
    vanish with a folder that was never written down."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        fsync_dir(new.parent)


def _write_atomically(target: Path, data: bytes) -> None:
    """Written aside, flushed, renamed into place, the rename flushed: once this returns, the file is
    on disk under its name (an answered upload survives a crash of the server or the machine)."""
    fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
