"""Every setting of the service in one place: environment variables SELAVPR_*, or `selavpr serve` flags."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from index_builder.results import DEFAULT_RERANK_K, DEFAULT_TOP_K
from index_builder.store import DEFAULT_GRACE_SECONDS
from model.config import FeatureBlock, parse_feature_block
from model.matching.precision import Precision
from model.options import ModelOptions
from model.preprocess import DEFAULT_MAX_PIXELS

MIB = 2**20
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})
log = logging.getLogger(__name__)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SELAVPR_", extra="ignore")

    index_dir: Path = Field(Path("data/index"), description="the index: published versions and feature files")
    references: Path = Field(
        Path("data/references"), description="the reference photos (uploads go here too)"
    )
    checkpoint: str = Field("default", description="'default', a named checkpoint or a path")
    device: str = Field("auto", description="cpu, cuda or auto (CUDA when present)")
    host: str = Field("127.0.0.1", description="address to listen on; beyond loopback an API key is required")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    image_size: int | None = Field(None, description="input side in pixels; unset: the checkpoint's (224)")
    local_mode: str | None = Field(
        None,
        description="local_head or patch_tokens; unset: local_head where the checkpoint has a trained one",
    )
    feature_block: FeatureBlock | None = Field(
        None, description="a block index or 'final'; unset: the checkpoint's default (docs: model)"
    )
    model_dtype: str = Field(
        "float32", description="the model forward: float32, bfloat16 or float16 (autocast)"
    )
    precision: str | None = Field(None, description="MNN re-ranking precision; unset: the device's default")
    resident_maps_bytes: int = Field(
        16 * 1024 * MIB,
        ge=0,
        description="on a GPU, hold the index's local maps in its memory up to this size",
    )

    max_batch_size: int = Field(8, ge=1, le=256, description="queries per model forward")
    max_batch_wait_ms: float = Field(
        0.0, ge=0, le=1000, description="wait this long for more queries; 0: batch only what queued meanwhile"
    )
    max_upload_bytes: int = Field(25 * MIB, ge=1024, description="bytes per uploaded image (multipart part)")
    max_images_per_request: int = Field(16, ge=1, le=256, description="images per /localize/batch or upload")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="pixels per image, checked on the header")

    default_top_k: int = Field(DEFAULT_TOP_K, ge=1, description="matches returned when top_k is not given")
    max_top_k: int = Field(100, ge=1, description="largest top_k accepted")
    default_rerank_k: int = Field(DEFAULT_RERANK_K, ge=1, description="candidates re-ranked by default")
    max_rerank_k: int = Field(1000, ge=1, description="largest rerank_k accepted")
    min_probability: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="answers below this calibrated probability say 'unknown' (no location); unset: off",
    )

    max_parts_per_request: int = Field(
        64, ge=1, le=1024, description="multipart fields per request (images, lat, lon, top_k, ...)"
    )
    decode_memory_bytes: int = Field(
        512 * MIB, ge=64 * MIB, description="memory for decoding images, all requests together; more wait"
    )

    # The cost of /localize: each request's candidates, the queue in front of the model, a deadline.
    max_candidates_per_request: int = Field(
        2000, ge=1, description="sum of rerank_k over a request's images (a batch of 16 at 125, one at 1000)"
    )
    max_queued_queries: int = Field(
        64, ge=1, description="queries waiting for the model; beyond it 503 with Retry-After"
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="a /localize request not answered by then gets 503; its work is dropped"
    )
    retry_after_s: int = Field(2, ge=1, description="the Retry-After of a 503 for a full queue")
    heavy_rerank_k: int = Field(
        DEFAULT_RERANK_K,
        ge=1,
        description="queries re-ranking more candidates run on a second worker, beside the ordinary ones",
    )
    shard_timeout_s: float = Field(
        5.0,
        gt=0,
        description="--engine ray: each try of a call to a location shard or the encoder (one retry)",
    )

    api_key: str | None = Field(None, description="required in X-API-Key by every state-changing /index call")
    localize_api_key: str | None = Field(None, description="required in X-API-Key by /localize when set")
    insecure_open_admin: bool = Field(
        False, description="trusted networks only: admin endpoints without a key beyond loopback (logged)"
    )
    root_path: str = Field("", description="the path prefix a reverse proxy serves under (uvicorn's)")
    max_connections: int = Field(128, ge=1, description="open connections and requests; beyond it 503")
    keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections are closed after this")
    head_timeout_s: float = Field(
        10.0, gt=0, description="a connection that has not sent a complete request head by then is closed"
    )
    body_timeout_s: float = Field(
        120.0, gt=0, description="a request body not received in full this long after its head: closed"
    )
    build_on_start: bool = Field(
        True, description="build at start-up when the index is empty and references exist"
    )
    grace_seconds: float = Field(
        DEFAULT_GRACE_SECONDS,
        ge=0,
        description="superseded index versions are deleted after this many seconds",
    )
    verify_bytes_per_s: int = Field(
        32 * MIB, ge=0, description="read rate of the served version's background verification; 0: off"
    )
    verify_interval_s: float = Field(30.0, gt=0, description="pause between verification passes")
    auto_rollback: bool = Field(
        False, description="serve the newest intact earlier version when the served one is damaged"
    )

    @field_validator("feature_block", mode="before")
    @classmethod
    def _parse_feature_block(cls, value: object) -> FeatureBlock | None:
        return None if value is None or value == "" else parse_feature_block(value)

    def model_options(self) -> ModelOptions:
        """The served model, as the index builder and the Ray encoder take it too."""
        return ModelOptions(
            checkpoint=self.checkpoint,
            device=self.device,
            image_size=self.image_size,
            local_mode=self.local_mode,
            feature_block=self.feature_block,
            model_dtype=self.model_dtype,
        )

    # The web page's map. None: markers and circles on a plain background (works offline).
    tile_url: str | None = Field(
        None, description="map tiles, e.g. https://tile.openstreetmap.org/{z}/{x}/{y}.png"
    )
    tile_attribution: str | None = Field(None, description="shown on the map; most tile providers require it")

    @field_validator("precision", mode="before")
    @classmethod
    def _check_precision(cls, value: object) -> str | None:
        """Checked at start-up: a wrong value would otherwise fail every /localize."""
        if value is None or value == "" or value == "default":
            return None
        return str(Precision(value)) if value in set(Precision) else _bad_precision(value)

    @field_validator("api_key", "localize_api_key")
    @classmethod
    def _no_empty_key(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("an empty API key is not allowed; leave the setting unset for no key")
        return value


def _bad_precision(value: object) -> str:
    raise ValueError(f"unknown precision {value!r}; expected one of {[p.value for p in Precision]} or unset")


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


class ExposureError(ValueError):
    """The settings would expose the admin endpoints without a key."""


def check_exposure(settings: Settings) -> None:
    """Admin endpoints need a key whenever the server listens beyond loopback, unless explicitly opted out."""
    if settings.api_key is not None or is_loopback(settings.host):
        return
    if settings.insecure_open_admin:
        log.warning(
            "SECURITY: the admin endpoints (/index/rebuild, /index/images) are OPEN to anyone who can reach "
            "%s:%d (SELAVPR_INSECURE_OPEN_ADMIN is set and SELAVPR_API_KEY is not)",
            settings.host,
            settings.port,
        )
        return
    raise ExposureError(
        f"refusing to serve on {settings.host} without an admin key: set SELAVPR_API_KEY (or --api-key), "
        "bind 127.0.0.1, or set SELAVPR_INSECURE_OPEN_ADMIN=1 on a trusted network"
    )
