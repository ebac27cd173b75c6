"""Reference images as the web page sees them: a paginated listing, and JPEG renditions by id."""

from __future__ import annotations

import io
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from PIL import Image

from app.errors import ApiError
from index_builder.store import ImageRecord, IndexVersion
from model.preprocess import open_rgb

JPEG_QUALITY = 85


class Rendition(StrEnum):
    """Fixed sizes only: a client cannot make the server resize to arbitrary dimensions."""

    THUMBNAIL = "thumbnail"
    IMAGE = "image"

    @property
    def max_side(self) -> int:
        return 320 if self is Rendition.THUMBNAIL else 1280


@dataclass(frozen=True)
class RenderedImage:
    jpeg: bytes
    etag: str


def list_page(version: IndexVersion, offset: int, limit: int) -> dict:
    ids = range(min(offset, len(version)), min(offset + limit, len(version)))  # ids are 0..n-1
    items = [
        {"id": r.id, "name": r.display_name, "path": r.path, "lat": r.lat, "lon": r.lon}
        for r in version.records(list(ids))
    ]
    return {
        "index_version": version.name,
        "total": len(version),
        "offset": offset,
        "limit": limit,
        "items": items,
    }


def record_of(version: IndexVersion, reference_id: int) -> ImageRecord:
    if not 0 <= reference_id < len(version):
        raise ApiError(404, "not_found", f"no reference {reference_id} in index {version.name}")
    return version.records([reference_id])[0]


def rendition_etag(record: ImageRecord, rendition: Rendition) -> str:
    return f'"{record.content_hash[:20]}-{rendition.value}"'


def render(
    references: Path, record: ImageRecord, rendition: Rendition, exif_transpose: bool
) -> RenderedImage:
    """Decode the stored file (oriented as the index saw it), shrink it, encode JPEG."""
    path = reference_file(references, record)
    image = open_rgb(path, exif_transpose=exif_transpose, name=record.path)
    image.thumbnail((rendition.max_side, rendition.max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return RenderedImage(out.getvalue(), rendition_etag(record, rendition))


def reference_file(references: Path, record: ImageRecord) -> Path:
    """The record's file under the references folder; a path escaping it (a tampered index) is refused."""
    root = references.resolve()
    path = (root / record.path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise ApiError(404, "not_found", f"reference {record.id}: its file is no longer available")
    return path
