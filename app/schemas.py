"""Request and response bodies of the HTTP API, one pydantic model each."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class MatchModel(BaseModel):
    id: int
    path: str = Field(description="relative to the references folder")
    rank: int = Field(description="1-based, after re-ranking")
    global_score: float
    mnn_matches: int
    lat: float | None
    lon: float | None
    utm_east: float | None
    utm_north: float | None


class LocationModel(BaseModel):
    lat: float
    lon: float
    source_id: int
    confidence: float


class Timings(BaseModel):
    decode: float
    extract: float
    search: float
    rerank: float
    total: float


class LocalizeResponse(BaseModel):
    matches: list[MatchModel]
    location: LocationModel | None
    index_version: str
    timings_ms: Timings


class BatchResponse(BaseModel):
    results: list[LocalizeResponse]


class RebuildJob(BaseModel):
    job_id: str
    state: Literal["idle", "running", "failed"]


class IndexStatusResponse(BaseModel):
    state: Literal["idle", "running", "failed"]
    progress: dict[str, Any] | None
    index_version: str | None
    num_images: int
    last_report: dict[str, Any] | None
    last_error: str | None


class StoredImage(BaseModel):
    path: str = Field(description="where it was stored, relative to the references folder")
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
