"""Reference folder -> a new published index version, encoding only what changed.

Four stage functions, run in order by `build_index` under the index's build lock:
1. `scan` the folder, read locations.csv files, hash contents (a file whose size and mtime match the
   previous version keeps its recorded hash);
2. `plan`: content already encoded with the same model (in the previous version, or in segments a killed
   build left behind) is reused; the rest is encoded;
3. `encode`: the images to encode are planned into batches and handed to an encoder (`encoding.py`:
   this process, or a Ray Data actor pool); features go to new segments as they fill;
4. `publish`: metadata, FAISS index and manifest written aside, then the CURRENT pointer swapped; old
   versions and unused segments are removed after the grace period (by `build_index`).
The Ray build runs the same stages with a Ray Data `Encoder` (index_builder/ray_build.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index_builder.calibration import Calibration
from index_builder.encoding import Encoder, LocalEncoder, plan_batches
from index_builder.global_index import GlobalIndexConfig, build_global_index
from index_builder.locations import CsvEntry, Location, location_from_filename, read_location_csvs
from index_builder.manifest import (
    BuildReport,
    CheckpointRecord,
    EncodingIdentity,
    IndexManifest,
    SegmentEntry,
)
from index_builder.self_calibration import SelfCalibrationConfig, self_calibrate
from index_builder.sharding import MAX_SHARDS, Partition, Reference, partition
from index_builder.sources import ReferenceImage, content_hash, scan_references
from index_builder.store import (
    DEFAULT_GRACE_SECONDS,
    DEFAULT_LOCAL_DTYPE,
    SEGMENT_FOLDERS,
    SEGMENTS,
    BuildLock,
    ImageRecord,
    IndexNotFound,
    IndexStoreError,
    IndexVersion,
    SegmentFiles,
    SegmentImage,
    collect_garbage,
    now_iso,
    publish_version,
    read_segment_meta,
    remove_unfinished,
    segment_dir,
    write_segment,
)
from index_builder.store.cleanup import UnpublishedCleanup
from index_builder.store.integrity import files_intact
from index_builder.store.location_shards import write_location_shards
from index_builder.store.shard_segments import place_in_shards
from index_builder.store.space import build_bytes_needed
from model.extractor import FeatureExtractor
from model.matching.defaults import resolve_precision
from model.options import ModelOptions

log = logging.getLogger(__name__)
# Merging per-shard top-N lists gives the unsharded answer only when each list is exact.
_EXACT_SHARDS_ONLY = "a sharded index needs exact per-shard search (--global-index flat), not {kind}"


@dataclass
class BuildConfig:
    references: Path
    index_dir: Path
    model: ModelOptions = field(default_factory=ModelOptions)
    full: bool = False  # re-encode everything
    batch_size: int | None = None  # None: 16 on CPU, 64 on GPU
    segment_size: int = 256  # images per segment (~120 MB at 61x61x128)
    decode_workers: int = 2
    local_dtype: str = DEFAULT_LOCAL_DTYPE
    global_index: GlobalIndexConfig = field(default_factory=GlobalIndexConfig)
    grace_seconds: float = DEFAULT_GRACE_SECONDS  # superseded versions stay for readers that opened them
    shards: int | None = None  # location shards; None: as many as the published version has (1: none)
    calibrate: bool = True  # self-calibrate the answers' probability (self_calibration.py)
    calibration: SelfCalibrationConfig = field(default_factory=SelfCalibrationConfig)

    def __post_init__(self) -> None:
        if self.shards is not None and not 1 <= self.shards <= MAX_SHARDS:
            raise ValueError(f"--shards must be between 1 and {MAX_SHARDS}, got {self.shards}")
        if (self.shards or 1) > 1 and self.global_index.kind != "flat":
            raise ValueError(_EXACT_SHARDS_ONLY.format(kind=self.global_index.kind))


@dataclass
class BuildProgress:
    """What a running build is doing; the CLI draws it as a bar, the service serves it as JSON."""

    phase: str = "starting"  # starting, scanning, hashing, encoding, publishing, done
    done: int = 0
    total: int = 0
    images_per_s: float = 0.0
    eta_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Available:
    """Where already-encoded content lives."""

    segment: str
    row: int
    image: SegmentImage


ProgressCallback = Callable[[BuildProgress], None]


@dataclass
class ScannedReferences:
    """Stage 1's result: the reference folder as it is now."""

    images: list[ReferenceImage]
    hashes: dict[str, str]  # rel_path -> content hash
    previous_records: dict[str, ImageRecord]  # the published version's, by path
    csv_entries: dict[str, CsvEntry]
    location_problems: list[str]
    unusable: list[tuple[str, str]]  # (path, reason): files that are not images at all


@dataclass
class BuildPlan:
    """Stage 2's result: what is reused from where, and what must be encoded."""

    identity: EncodingIdentity
    available: dict[str, _Available]  # content hash -> stored features; encoding adds to it
    reused_hashes: set[str]
    todo: list[ReferenceImage]  # one image per content hash not yet available


@dataclass
class EncodeOutcome:
    """Stage 3's result."""

    skipped: list[tuple[str, str]]  # (path, reason): images that could not be decoded
    seconds: float


def build_index(
    config: BuildConfig,
    extractor: FeatureExtractor | None = None,
    on_progress: ProgressCallback | None = None,
    encoder: Encoder | None = None,
) -> BuildReport:
    """scan -> plan -> encode -> publish, under the index's build lock. `extractor` defines the encoding
    identity (and encodes, unless `encoder` is given: e.g. a `RayDataEncoder` running the same model on a
    Ray Data actor pool)."""
    started = time.monotonic()
    progress = BuildProgress()
    notify = on_progress or (lambda p: None)
    index_dir = config.index_dir
    # A failure removes what this build wrote before the lock goes (the disk space comes back).
    with BuildLock(index_dir), UnpublishedCleanup(index_dir) as cleanup:
        remove_unfinished(index_dir)
        extractor = extractor or FeatureExtractor.from_options(config.model)
        identity = encoding_identity(extractor, config.local_dtype)
        previous = _open_previous(index_dir)
        try:
            scanned = scan(config.references, previous, progress, notify)
            planned = plan(config, identity, previous, scanned, progress, notify)
            cleanup.require(build_bytes_needed(identity, len(planned.todo), len(scanned.images)))
            encoder = encoder or LocalEncoder(extractor, config.local_dtype, config.decode_workers)
            encoded = encode(config, encoder, planned, scanned, progress, notify)
            report = publish(config, extractor, previous, scanned, planned, encoded, progress, notify)
        finally:
            if previous:
                previous.close()
        removed = collect_garbage(index_dir, config.grace_seconds)
        log.info(
            "published %s; removed versions %s and %d segments",
            report.version,
            removed.versions,
            len(removed.segments),
        )
        for problem in removed.problems:
            log.warning("after publishing %s: %s", report.version, problem)
        report.seconds = round(time.monotonic() - started, 3)
        progress.phase, progress.done, progress.total = "done", report.total, report.total
        notify(progress)
        return report


def scan(
    references: Path, previous: IndexVersion | None, progress: BuildProgress, notify: ProgressCallback
) -> ScannedReferences:
    """Stage 1: the images under `references`, their locations.csv entries and content hashes."""
    progress.phase = "scanning"
    notify(progress)
    unusable: list[tuple[str, str]] = []
    images = scan_references(references, unusable)
    csv_entries, location_problems = read_location_csvs(references)
    previous_records = {r.path: r for r in previous.all_records()} if previous else {}
    hashes = _hash_all(images, previous_records, progress, notify)
    return ScannedReferences(images, hashes, previous_records, csv_entries, location_problems, unusable)


def plan(
    config: BuildConfig,
    identity: EncodingIdentity,
    previous: IndexVersion | None,
    scanned: ScannedReferences,
    progress: BuildProgress,
    notify: ProgressCallback,
) -> BuildPlan:
    """Stage 2: content already encoded with the same model (in the previous version, unless --full, or
    in segments a killed build left behind) is reused; every other content hash is encoded once."""
    reuse_previous = previous is not None and previous.identity == identity and not config.full
    available = _reusable_content(
        config.index_dir, identity, previous, scanned.previous_records if reuse_previous else {}
    )
    todo, seen = [], set(available)
    for image in scanned.images:
        content = scanned.hashes[image.rel_path]
        if content not in seen:
            seen.add(content)
            todo.append(image)
    progress.phase, progress.done, progress.total = "encoding", 0, len(todo)
    notify(progress)
    return BuildPlan(identity, available, set(available), todo)


def encode(
    config: BuildConfig,
    encoder: Encoder,
    planned: BuildPlan,
    scanned: ScannedReferences,
    progress: BuildProgress,
    notify: ProgressCallback,
) -> EncodeOutcome:
    """Stage 3: encode `planned.todo` in planned batches (this process, or a Ray Data actor pool) into new
    segments, adding each image to `planned.available`."""
    started = time.monotonic()
    if not planned.todo:
        return EncodeOutcome([], 0.0)
    batches = plan_batches(planned.todo, config.batch_size or encoder.default_batch_size())
    writer = _SegmentBuffer(
        config.index_dir / SEGMENTS, planned.identity, config.segment_size, planned.available
    )
    skipped: list[tuple[str, str]] = []
    for encoded in encoder.encode(batches):
        skipped += encoded.skipped
        pairs = zip(encoded.images, encoded.metas, strict=True)
        segment_images = [SegmentImage(scanned.hashes[image.rel_path], *meta) for image, meta in pairs]
        writer.add(segment_images, encoded.global_desc, encoded.local)
        _advance(progress, notify, started, encoded.size)
    writer.flush()
    return EncodeOutcome(skipped, time.monotonic() - started)


def publish(
    config: BuildConfig,
    extractor: FeatureExtractor,
    previous: IndexVersion | None,
    scanned: ScannedReferences,
    planned: BuildPlan,
    encoded: EncodeOutcome,
    progress: BuildProgress,
    notify: ProgressCallback,
) -> BuildReport:
    """Stage 4: metadata, FAISS index (and location shards) and manifest written aside, then the CURRENT
    pointer swapped. Returns the report of the published version."""
    progress.phase = "publishing"
    notify(progress)
    index_dir = config.index_dir
    previous_records = scanned.previous_records
    skipped = scanned.unusable + encoded.skipped
    records = _records(
        scanned.images, scanned.hashes, planned.available, scanned.csv_entries, previous_records
    )
    partition = _location_partition(config, previous, records)
    if partition is not None:  # each shard's maps into segments of its own
        records, partition = _place_in_shards(config, planned.identity, records, partition)
    global_desc = _global_descriptors(index_dir, records, planned.identity.global_dim)
    segments = sorted({r.segment for r in records})
    report = BuildReport(
        version="",
        total=len(records),
        encoded=sum(1 for r in records if r.content_hash not in planned.reused_hashes),
        reused=sum(1 for r in records if r.content_hash in planned.reused_hashes),
        removed=len(set(previous_records) - {img.rel_path for img in scanned.images}),
        skipped=len(skipped),
        seconds=0.0,
        with_location=sum(1 for r in records if r.utm_east is not None),
        encode_seconds=round(encoded.seconds, 3),
        skipped_files=[{"path": p, "reason": why} for p, why in skipped],
        location_problems=scanned.location_problems,
    )
    calibration, note = _calibrate(config, planned.identity, records, global_desc)
    report.calibration_seconds = calibration.seconds if calibration else 0.0
    manifest = IndexManifest(
        encoding=planned.identity,
        checkpoint=CheckpointRecord(
            spec=extractor.info.spec or extractor.info.source,
            source=extractor.info.source,
            description=extractor.info.description,
            fingerprint=extractor.info.fingerprint,
        ),
        references=str(config.references.resolve()),
        count=len(records),
        global_index=config.global_index,
        segments=[_segment_entry(index_dir, s) for s in segments],
        report=report,
        location_shards=partition.shards if partition else [],
        calibration=calibration.to_dict() if calibration else None,
        calibration_note=note,
    )

    def write_location_files(version_dir: Path) -> list[str]:
        if partition is None:
            return []
        return write_location_shards(version_dir, partition, global_desc, config.global_index, records)

    published = publish_version(
        index_dir,
        records,
        build_global_index(global_desc, config.global_index),
        manifest,
        write_location_files,
    )
    report.version = published.version
    return report


def _calibrate(
    config: BuildConfig, identity: EncodingIdentity, records: Sequence[ImageRecord], global_desc: np.ndarray
) -> tuple[Calibration | None, str]:
    """Self-calibration from the stored features (no model forward), matched with the precision a CPU
    server would use."""
    if not config.calibrate:
        return None, "uncalibrated: built with --no-calibrate"
    reader = _SegmentReader(config.index_dir, records)
    try:
        precision = str(resolve_precision(None, torch.device("cpu"), identity.local_shape))
        calibration, note = self_calibrate(
            records, global_desc, reader.read, precision, config.calibration, identity.fingerprint
        )
    finally:
        reader.close()
    log.info("%s", note)
    return calibration, note


class _SegmentReader:
    """Reference id -> its stored local map (decoded, float32), read from the segments it lives in."""

    def __init__(self, index_dir: Path, records: Sequence[ImageRecord]) -> None:
        self.index_dir, self.records = index_dir, records
        self.open: dict[str, SegmentFiles] = {}

    def read(self, ids: Sequence[int]) -> torch.Tensor:
        maps = []
        for i in ids:
            record = self.records[i]
            if record.segment not in self.open:
                self.open[record.segment] = SegmentFiles(segment_dir(self.index_dir, record.segment))
            maps.append(self.open[record.segment].read_local([record.row])[0])
        return torch.from_numpy(np.stack(maps))

    def close(self) -> None:
        for files in self.open.values():
            files.close()


def _location_partition(
    config: BuildConfig, previous: IndexVersion | None, records: Sequence[ImageRecord]
) -> Partition | None:
    """How the references split into location shards; None for an index that is not sharded. A build
    that does not say keeps the published version's number of shards."""
    shards = config.shards
    if shards is None:
        shards = len(previous.manifest.location_shards) if previous else 1
    if shards <= 1:
        return None
    if config.global_index.kind != "flat":
        raise ValueError(_EXACT_SHARDS_ONLY.format(kind=config.global_index.kind))
    references = [Reference(r.id, r.content_hash, r.lat, r.lon) for r in records]
    return partition(references, shards)


def _place_in_shards(
    config: BuildConfig, identity: EncodingIdentity, records: list[ImageRecord], partition: Partition
) -> tuple[list[ImageRecord], Partition]:
    """The records with every reference in a segment of its own shard (store/shard_segments.py), and the
    partition with each shard's segments."""
    placed = place_in_shards(
        config.index_dir, identity, records, partition.assignment, len(partition.shards), config.segment_size
    )
    log.info("location shards: %d stored maps copied into their shard's segments", placed.copied)
    shards = [replace(s, segments=own) for s, own in zip(partition.shards, placed.segments, strict=True)]
    return placed.records, Partition(shards, partition.assignment)


def encoding_identity(extractor: FeatureExtractor, local_dtype: str) -> EncodingIdentity:
    global_dim, local_shape = extractor.output_shapes()
    return EncodingIdentity(
        fingerprint=extractor.info.fingerprint,
        local_mode=str(extractor.local_mode),
        image_size=extractor.preprocessing.image_size[0],
        exif_transpose=extractor.preprocessing.exif_transpose,
        local_dtype=local_dtype,
        global_dim=global_dim,
        local_shape=local_shape,
        feature_block=extractor.feature_block,
        model_dtype=str(extractor.model_dtype),
    )


def _open_previous(index_dir: Path) -> IndexVersion | None:
    """The published version, whose features can be reused; a damaged one is rebuilt from scratch."""
    try:
        return IndexVersion.open_current(index_dir)
    except IndexNotFound:
        return None
    except IndexStoreError as exc:
        log.warning("not reusing the published version: %s", exc)
        return None


def _hash_all(
    images: Sequence[ReferenceImage],
    previous: dict[str, ImageRecord],
    progress: BuildProgress,
    notify: ProgressCallback,
) -> dict[str, str]:
    """rel_path -> content hash; an unchanged size and mtime keeps the previous version's hash."""
    progress.phase, progress.done, progress.total = "hashing", 0, len(images)
    hashes = {}
    for image in images:
        known = previous.get(image.rel_path)
        if known and (known.file_size, known.mtime_ns) == (image.file_size, image.mtime_ns):
            hashes[image.rel_path] = known.content_hash
        else:
            hashes[image.rel_path] = content_hash(image.abs_path)
        progress.done += 1
        if progress.done % 256 == 0:
            notify(progress)
    notify(progress)
    return hashes


def _reusable_content(
    index_dir: Path,
    identity: EncodingIdentity,
    previous: IndexVersion | None,
    previous_records: dict[str, ImageRecord],
) -> dict[str, _Available]:
    """content hash -> encoded features: the previous version's (same identity) and every complete
    segment of the same identity that no version references (left by a build that was killed)."""
    available: dict[str, _Available] = {}
    for record in previous_records.values():
        exif = record.exif_location
        image = SegmentImage(
            record.content_hash, record.width, record.height, json.loads(exif) if exif else None
        )
        available[record.content_hash] = _Available(record.segment, record.row, image)
    referenced = set(previous.segment_names) if previous else set()
    folders = [index_dir / folder for folder in SEGMENT_FOLDERS]
    for found in sorted(p for folder in folders if folder.is_dir() for p in folder.iterdir()):
        if found.name in referenced or found.name.startswith("."):
            continue
        meta = read_segment_meta(found)
        if not meta or meta.encoding != identity or not files_intact(found, meta.files):
            continue  # a segment no version vouches for is reused only when its checksums hold
        for row, image in enumerate(meta.images):
            available.setdefault(image.content_hash, _Available(found.name, row, image))
    return available


def _advance(progress: BuildProgress, notify: ProgressCallback, started: float, count: int) -> None:
    progress.done += count
    elapsed = time.monotonic() - started
    progress.images_per_s = progress.done / elapsed if elapsed > 0 else 0.0
    left = progress.total - progress.done
    progress.eta_s = left / progress.images_per_s if progress.images_per_s > 0 else None
    notify(progress)


class _SegmentBuffer:
    """Collects encoded images and writes a segment whenever `capacity` are ready."""

    def __init__(
        self, segments_dir: Path, identity: EncodingIdentity, capacity: int, available: dict[str, _Available]
    ) -> None:
        self.segments_dir, self.identity, self.capacity = segments_dir, identity, capacity
        self.available = available
        self.images: list[SegmentImage] = []
        self.globals: list[np.ndarray] = []
        self.locals: list[dict[str, np.ndarray]] = []

    def add(self, images: list[SegmentImage], global_desc: np.ndarray, local: dict[str, np.ndarray]) -> None:
        """`global_desc` (n, D) float32 and `local` (the `encode_local` arrays) of `images`."""
        if not images:
            return
        self.images += images
        self.globals.append(global_desc)
        self.locals.append(local)
        if len(self.images) >= self.capacity:
            self.flush()

    def flush(self) -> None:
        if not self.images:
            return
        arrays = {"global": np.concatenate(self.globals)}
        arrays |= {key: np.concatenate([part[key] for part in self.locals]) for key in self.locals[0]}
        self.segments_dir.mkdir(parents=True, exist_ok=True)
        name = write_segment(self.segments_dir, self.identity, self.images, arrays)
        for row, image in enumerate(self.images):
            self.available[image.content_hash] = _Available(name, row, image)
        self.images, self.globals, self.locals = [], [], []


def _resolve_location(
    rel_path: str, csv_entries: dict[str, CsvEntry], exif: dict[str, Any] | None
) -> Location | None:
    """First found wins: locations.csv, then the file-name convention, then EXIF GPS."""
    entry = csv_entries.get(rel_path)
    return (
        (entry.location if entry else None)
        or location_from_filename(rel_path)
        or (Location(**exif) if exif else None)
    )


def _records(
    images: Sequence[ReferenceImage],
    hashes: dict[str, str],
    available: dict[str, _Available],
    csv_entries: dict[str, CsvEntry],
    previous: dict[str, ImageRecord],
) -> list[ImageRecord]:
    records = []
    stamp = now_iso()
    for image in images:
        found = available.get(hashes[image.rel_path])
        if found is None:  # undecodable: reported as skipped
            continue
        location = _resolve_location(image.rel_path, csv_entries, found.image.exif_location)
        entry = csv_entries.get(image.rel_path)
        before = previous.get(image.rel_path)
        unchanged = before is not None and before.content_hash == found.image.content_hash
        records.append(
            ImageRecord(
                id=len(records),
                path=image.rel_path,
                content_hash=found.image.content_hash,
                file_size=image.file_size,
                mtime_ns=image.mtime_ns,
                width=found.image.width,
                height=found.image.height,
                lat=location.lat if location else None,
                lon=location.lon if location else None,
                utm_east=location.utm_east if location else None,
                utm_north=location.utm_north if location else None,
                utm_zone=location.utm_zone if location else None,
                location_source=location.source if location else None,
                exif_location=json.dumps(found.image.exif_location) if found.image.exif_location else None,
                added_at=before.added_at if unchanged else stamp,
                segment=found.segment,
                row=found.row,
                name=entry.name if entry else None,
            )
        )
    return records


def _global_descriptors(index_dir: Path, records: Sequence[ImageRecord], dim: int) -> np.ndarray:
    out = np.empty((len(records), dim), dtype=np.float32)
    by_segment: dict[str, list[ImageRecord]] = {}
    for record in records:
        by_segment.setdefault(record.segment, []).append(record)
    for segment, members in by_segment.items():
        rows = SegmentFiles(segment_dir(index_dir, segment))
        try:
            descriptors = rows.read_global()
        finally:
            rows.close()
        out[[m.id for m in members]] = descriptors[[m.row for m in members]]
    return out


def _segment_entry(index_dir: Path, name: str) -> SegmentEntry:
    meta = read_segment_meta(segment_dir(index_dir, name))
    if meta is None:
        raise IndexStoreError(f"segment {name} is unreadable; run the build again with --full")
    return meta.entry(name)
