"""What a localization answers: ranked reference images and an estimated location. One definition, used
by the CLI (`selavpr localize` prints it as JSON) and the HTTP API (its response model)."""

from __future__ import annotations

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
