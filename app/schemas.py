"""Request and response bodies of the HTTP API, one pydantic model each. A localization's own shape is
index_builder.results.LocalizeResult, shared with the CLI."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from index_builder.results import LocalizeResult


class BatchResponse(BaseModel):
    results: list[LocalizeResult]


class RebuildJob(BaseModel):
    job_id: str
    state: Literal["idle", "running", "failed", "queued"] = Field(
        description="queued: a build is running; this one starts after it (and sees everything up to then)"
    )


class IndexStatusResponse(BaseModel):
    state: Literal["idle", "running", "failed"]
    queued: bool = Field(False, description="one more build will run after the current one")
    progress: dict[str, Any] | None
    index_version: str | None
    num_images: int
    last_report: dict[str, Any] | None
    last_error: str | None
    verification: dict[str, Any] | None = Field(
        None,
        description="the last background check of the served version's files (None: not yet run, or off)",
    )
    calibration: dict[str, Any] | None = Field(
        None,
        description="the served version's calibration of the answers' probability (as `selavpr index "
        "status` shows it), or why it has none; None: no version served",
    )


class StoredImage(BaseModel):
    name: str = Field(description="the display name: the uploaded file's own name, sanitised")
    path: str = Field(
        description="where it was stored (a server-chosen name), relative to the references folder"
    )
    lat: float | None
    lon: float | None


class UploadResponse(BaseModel):
    stored: list[StoredImage]
    rebuild: RebuildJob | None


class ErrorBody(BaseModel):
    status: int
    type: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ReferenceItem(BaseModel):
    id: int = Field(description="valid within index_version only")
    name: str = Field(description="the uploaded file's original name when known, else the file name")
    path: str = Field(description="relative to the references folder")
    lat: float | None
    lon: float | None


class ReferencePage(BaseModel):
    index_version: str
    total: int
    offset: int
    limit: int
    items: list[ReferenceItem]


class ImageSize(BaseModel):
    width: int
    height: int


class MatchPair(BaseModel):
    query: tuple[float, float] = Field(description="x, y in the query image's pixels (EXIF-oriented)")
    reference: tuple[float, float] = Field(description="x, y in the reference image's pixels")


class PairsResponse(BaseModel):
    reference_id: int
    index_version: str
    mnn_matches: int = Field(description="all mutual nearest-neighbour pairs")
    query_size: ImageSize
    reference_size: ImageSize
    pairs: list[MatchPair] = Field(description="at most max_pairs of them, evenly spread over the query")


class TileLayer(BaseModel):
    url: str
    attribution: str | None


class UiConfig(BaseModel):
    max_upload_bytes: int
    max_images_per_request: int
    default_top_k: int
    max_top_k: int
    accepted_types: list[str]
    accepted_suffixes: list[str]
    admin_key_required: bool
    localize_key_required: bool
    tiles: TileLayer | None
