"""Reading uploaded files within the per-image and per-request limits."""

from __future__ import annotations

from fastapi import UploadFile

from app.errors import ApiError
from app.settings import Settings


async def read_uploads(uploads: list[UploadFile], settings: Settings) -> list[bytes]:
    """The files' bytes; 413 for too many files or one over the per-image limit."""
    if len(uploads) > settings.max_images_per_request:
        raise ApiError(
            413, "too_many_images", f"at most {settings.max_images_per_request} images per request"
        )
    contents = []
    for upload in uploads:
        data = await upload.read()
        if len(data) > settings.max_upload_bytes:
            raise ApiError(413, "payload_too_large", f"image over {settings.max_upload_bytes:,} bytes")
        contents.append(data)
    return contents
