"""Storing uploaded reference images: checked first, named by the server, written atomically."""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import tempfile
import threading
import uuid
from pathlib import Path

from PIL import Image

from app.errors import ApiError
from index_builder.sources import LOCATIONS_CSV
from model.preprocess import open_rgb

UPLOADS = "uploads"
SUFFIX_BY_FORMAT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "HEIF": ".heic", "AVIF": ".avif"}
_csv_lock = threading.Lock()


def check_reference(data: bytes, max_pixels: int) -> str:
    """Decode fully (a bad image raises ImageDecodeError) and return the file suffix to store it under."""
    open_rgb(data, exif_transpose=False, max_pixels=max_pixels, name="upload")
    with Image.open(io.BytesIO(data)) as image:
        suffix = SUFFIX_BY_FORMAT.get(image.format or "")
    if suffix is None:
        accepted = ", ".join(sorted(SUFFIX_BY_FORMAT))
        raise ApiError(415, "unsupported_media_type", f"reference images must be one of {accepted}")
    return suffix


def write_reference(references: Path, data: bytes, suffix: str, location: tuple[float, float] | None) -> dict:
    """Write under references/uploads/<date>/<uuid><suffix> (never the upload's own name); a location
    goes into uploads/locations.csv."""
    rel = f"{dt.datetime.now(dt.UTC):%Y%m%d}/{uuid.uuid4().hex}{suffix}"
    target = references / UPLOADS / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(target, data)
    if location is not None:
        _append_location(references / UPLOADS / LOCATIONS_CSV, rel, location)
    lat, lon = location if location else (None, None)
    return {"path": f"{UPLOADS}/{rel}", "lat": lat, "lon": lon}


def _write_atomically(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _append_location(csv_path: Path, rel: str, location: tuple[float, float]) -> None:
    with _csv_lock:
        new = not csv_path.exists()
        with open(csv_path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["path", "lat", "lon"])
            writer.writerow([rel, f"{location[0]:.8f}", f"{location[1]:.8f}"])
            f.flush()
            os.fsync(f.fileno())
