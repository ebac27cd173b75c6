"""What a localization answers: ranked reference images and an estimated location. One definition, used
by the CLI (`selavpr localize` prints it as JSON) and the HTTP API (its response model)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

DEFAULT_TOP_K = 5  # matches returned
DEFAULT_RERANK_K = 100  # global candidates re-ranked by MNN counts, as in the paper


class Match(BaseModel):
    id: int = Field(description="reference id in the served index version")
    name: str = Field(description="the reference's display name (an uploaded photo's own file name)")
    path: str = Field(description="where it is stored, relative to the references folder")
    rank: int = Field(description="1-based, after re-ranking")
    global_score: float = Field(description="cosine similarity of the global descriptors")
    mnn_matches: int = Field(description="mutual nearest-neighbour matches of the local features")
    lat: float | None
    lon: float | None
    utm_east: float | None
    utm_north: float | None


class EstimatedLocation(BaseModel):
    lat: float
    lon: float
    source_id: int = Field(description="the reference image it comes from")
    confidence: float = Field(description="that image's MNN matches / the query's local positions, in [0, 1]")


class Timings(BaseModel):
    """Milliseconds spent in each stage; extract and search are shared by the queries of one batch."""

    decode: float = 0.0
    extract: float = 0.0
    search: float = 0.0
    rerank: float = 0.0
    total: float = 0.0


class LocalizeResult(BaseModel):
    matches: list[Match]
    location: EstimatedLocation | None
    index_version: str
    status: Literal["located", "unknown", "no_location"] = Field(
        "located",
        description="located: `location` is the answer; unknown: its probability is below the request's "
        "min_probability (likely a place missing from the database), no location given; no_location: "
        "no match has a location",
    )
    probability: float | None = Field(
        None,
        description="calibrated P(the answer's location is within `radius_m` of the truth); null when the "
        "index version is uncalibrated or nothing is located",
    )
    radius_m: float | None = Field(None, description="the radius `probability` is about (25 m by default)")
    calibration: str | None = Field(
        None, description="the calibration's id (self-... fitted at build time, supplied-...); null: none"
    )
    timings_ms: Timings = Field(default_factory=Timings)
    partial: bool = Field(
        False, description="true when a location shard did not answer in time: its references are missing"
    )
    missing_shards: list[str] = Field(
        default_factory=list, description="the location shards that did not answer (e.g. shard-03)"
    )
    coverage: float = Field(
        1.0, description="share of the searched references (all, or those a location prior selects) answered"
    )


def apply_min_probability(result: LocalizeResult, min_probability: float | None) -> LocalizeResult:
    """Below `min_probability` the answer becomes 'unknown': no location, the matches still listed. An
    uncalibrated answer (probability null) cannot be judged and is left as it is (its `calibration` is
    null)."""
    if min_probability is None or result.location is None or result.probability is None:
        return result
    if result.probability < min_probability:
        result.location, result.status = None, "unknown"
    return result
