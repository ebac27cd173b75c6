"""Every setting of the service in one place: environment variables SELAVPR_*, or `selavpr serve` flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.preprocess import DEFAULT_MAX_PIXELS

MIB = 2**20


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SELAVPR_", extra="ignore")

    index_dir: Path = Path("data/index")
    references: Path = Path("data/references")
    checkpoint: str = "default"
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    image_size: int | None = None  # None: the checkpoint's (224 for the released ones)
    local_mode: str | None = None
    model_dtype: str = "float32"  # the model forward: float32, bfloat16 or float16 (autocast)
    precision: str | None = None  # MNN precision; None: the device's default

    max_batch_size: int = Field(8, ge=1, le=256, description="queries per model forward")
    max_batch_wait_ms: float = Field(
        0.0, ge=0, le=1000, description="wait this long for more queries; 0: batch only what queued meanwhile"
    )
    max_upload_bytes: int = Field(25 * MIB, ge=1024)
    max_images_per_request: int = Field(16, ge=1, le=256)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)

    default_top_k: int = Field(5, ge=1)
    max_top_k: int = Field(100, ge=1)
    default_rerank_k: int = Field(100, ge=1)
    max_rerank_k: int = Field(1000, ge=1)

    api_key: str | None = None  # required in X-API-Key by every state-changing /index call when set
    localize_api_key: str | None = None  # required by /localize when set
    build_on_start: bool = True  # build when the index is empty and references exist
    grace_seconds: float = Field(600.0, ge=0)
