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
        # BodySizeLimit refuses a larger part while it streams in; reading at most one byte more here
        # keeps this bounded whatever is in front of it.
        data = await upload.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise ApiError(413, "payload_too_large", f"image over {settings.max_upload_bytes:,} bytes")
        contents.append(data)
    return contents
