"""What a published index version records about itself: one typed manifest, read and written only here.

    versions/v000007/manifest.json

`encoding` says what the features were computed with (indexes of different encodings never mix),
`checkpoint` what to load to search it, `segments` which feature segments it uses, `report` how it was built,
`location_shards` (empty unless built with `--shards N`) how its references are split into location
shards, each with its own global index (`shard-00.faiss`), ids (`shard-00.ids.npy`) and id table
(`shard-00.rows.npy`) in the version, and its own feature segments (listed in its entry).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from index_builder.errors import IndexNotFound
from index_builder.global_index import GlobalIndexConfig
from index_builder.sharding import ShardPlan
from model.config import FINAL, FeatureBlock

FORMAT = "selavpr-index"
# 3: location shards own their segments and id tables (ShardPlan.segments, shard-00.rows.npy);
# 2: feature segments (`segments`); 1 called them `shards`. All three still read.
FORMAT_VERSION = 3
SHARED_SEGMENTS_FORMAT = 2  # what a version whose files no shard owns is written as (older releases read it)
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class EncodingIdentity:
    """Everything that determines stored features. Segments of another identity are never reused."""

    fingerprint: str
    local_mode: str
    image_size: int
    exif_transpose: bool
    local_dtype: str
    global_dim: int
    local_shape: tuple[int, int, int]
    feature_block: FeatureBlock = FINAL  # indexes written before it existed all used the final norm
    model_dtype: str = "float32"  # the forward's dtype; manifests from before it was recorded: float32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncodingIdentity:
        return cls(**{**data, "local_shape": tuple(data["local_shape"])})


@dataclass(frozen=True)
class CheckpointRecord:
    """The model an index was built with."""

    spec: str  # what to load at search time: 'default' stays portable across machines' caches
    source: str  # the file it was read from on the building machine
    description: str
    fingerprint: str


@dataclass(frozen=True)
class SegmentEntry:
    name: str
    count: int
    files: dict[str, str]  # file name -> sha256


@dataclass
class BuildReport:
    """How a version was built; `selavpr index build` prints `summary()`, the manifest keeps it all."""

    version: str
    total: int
    encoded: int
    reused: int
    removed: int
    skipped: int
    seconds: float
    with_location: int = 0
    encode_seconds: float = 0.0
    calibration_seconds: float = 0.0
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    location_problems: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The one JSON line `selavpr index build` ends with."""
        keys = ("version", "total", "encoded", "reused", "removed", "skipped", "seconds")
        return {k: getattr(self, k) for k in keys}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildReport:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class IndexManifest:
    encoding: EncodingIdentity
    checkpoint: CheckpointRecord
    references: str
    count: int
    global_index: GlobalIndexConfig
    segments: list[SegmentEntry]
    report: BuildReport | None = None
    location_shards: list[ShardPlan] = field(default_factory=list)  # empty: one index, not sharded
    # index_builder.calibration.Calibration.to_dict(); None: answers are served uncalibrated (why: the note)
    calibration: dict[str, Any] | None = None
    calibration_note: str = ""
    # set when the version is published
    version: str = ""
    created_at: str = ""
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        owned = any(shard.owns_files for shard in self.location_shards)
        format_version = FORMAT_VERSION if owned else SHARED_SEGMENTS_FORMAT
        return {"format": FORMAT, "format_version": format_version, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexManifest:
        report = data.get("report")
        return cls(
            encoding=EncodingIdentity.from_dict(data["encoding"]),
            checkpoint=CheckpointRecord(**data["checkpoint"]),
            references=data["references"],
            count=int(data["count"]),
            global_index=GlobalIndexConfig(**data["global_index"]),
            segments=[SegmentEntry(**s) for s in data["segments" if "segments" in data else "shards"]],
            report=BuildReport.from_dict(report) if report else None,
            location_shards=[ShardPlan.from_dict(s) for s in data.get("location_shards", [])],
            calibration=data.get("calibration"),
            calibration_note=data.get("calibration_note", "uncalibrated: built before calibration existed"),
            version=data["version"],
            created_at=data["created_at"],
            files=dict(data["files"]),
        )

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, version_dir: Path) -> IndexManifest:
        """The manifest of a version directory; IndexNotFound (with the reason) if it is not a readable
        version of a format this release knows."""
        path = version_dir / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise IndexNotFound(f"{version_dir.name}: unreadable manifest ({type(exc).__name__})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise IndexNotFound(f"{version_dir.name}: not a {FORMAT} version")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise IndexNotFound(
                f"{version_dir.name}: written by a newer release (format {data['format_version']})"
            )
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexNotFound(
                f"{version_dir.name}: invalid manifest ({type(exc).__name__}: {exc})"
            ) from None
