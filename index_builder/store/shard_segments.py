"""Location shards own their feature segments: every segment a sharded version uses holds the maps of one
shard's references, so a node serving a shard needs that shard's segments and no other (docs/scaling.md).

A build encodes into segments without knowing the shards (the partition needs every reference's location,
and EXIF locations are read while encoding). Before publishing, each segment the version uses is given to
the shard holding most of its references, when that is at least half of its rows (so a node holds at most
as many rows of other shards' references as of its own); that shard's references in it stay where they
are. Every other reference's stored arrays are copied as stored (not re-encoded) into new segments of its
own shard. An incremental build therefore leaves every reference that stays in its shard where it was:
another shard's files are not rewritten, and only new references and those whose shard changed are
written to new segments of their shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from index_builder.errors import IndexStoreError
from index_builder.manifest import EncodingIdentity
from index_builder.store.metadata import ImageRecord
from index_builder.store.segments import SEGMENTS, SegmentFiles, read_segment_meta, segment_dir, write_segment
from index_builder.store.space import check_room, stored_bytes_per_image

NO_OWNER = -1

# (segment name, row): where a reference's stored arrays are
Place = tuple[str, int]


@dataclass
class ShardSegments:
    """The version's records with every reference in a segment of its own shard."""

    records: list[ImageRecord]
    segments: list[tuple[str, ...]]  # each shard's segments, sorted
    copied: int  # stored maps copied into new segments of their shard


def place_in_shards(
    index_dir: Path,
    identity: EncodingIdentity,
    records: Sequence[ImageRecord],
    assignment: np.ndarray,
    shard_count: int,
    segment_size: int,
) -> ShardSegments:
    """Give each segment to at most one shard and copy every reference not in one of its own shard's
    segments into new segments of that shard (`segment_size` maps each). assignment[id]: the shard of
    the reference with that id. DiskFull when the copies do not fit."""
    owners = segment_owners(index_dir, records, assignment)
    to_copy: list[dict[Place, None]] = [{} for _ in range(shard_count)]  # ordered, each place once
    for record in records:
        shard = int(assignment[record.id])
        if owners[record.segment] != shard:
            to_copy[shard][(record.segment, record.row)] = None
    copies = sum(len(places) for places in to_copy)
    check_room(index_dir, copies * stored_bytes_per_image(identity))
    moved: dict[tuple[int, str, int], Place] = {}
    for shard, unique in enumerate(to_copy):
        places = list(unique)
        for start in range(0, len(places), segment_size):
            chunk = places[start : start + segment_size]
            name = copy_rows(index_dir, identity, chunk)
            moved |= {(shard, *place): (name, row) for row, place in enumerate(chunk)}
    placed = []
    for record in records:
        new = moved.get((int(assignment[record.id]), record.segment, record.row))
        placed.append(replace(record, segment=new[0], row=new[1]) if new else record)
    segments = [sorted({r.segment for r in placed if assignment[r.id] == k}) for k in range(shard_count)]
    return ShardSegments(placed, [tuple(own) for own in segments], copies)


def segment_owners(index_dir: Path, records: Sequence[ImageRecord], assignment: np.ndarray) -> dict[str, int]:
    """Segment name -> the shard it is given to (NO_OWNER: none holds at least half of its rows)."""
    shards_in: dict[str, list[int]] = {}
    for record in records:
        shards_in.setdefault(record.segment, []).append(int(assignment[record.id]))
    owners = {}
    for name, shards in shards_in.items():
        meta = read_segment_meta(segment_dir(index_dir, name))
        if meta is None:
            raise IndexStoreError(f"segment {name} is unreadable; run the build again with --full")
        counts = np.bincount(shards)
        best = int(np.argmax(counts))
        owners[name] = best if 2 * counts[best] >= len(meta.images) else NO_OWNER
    return owners


def copy_rows(index_dir: Path, identity: EncodingIdentity, places: Sequence[Place]) -> str:
    """A new segment holding these stored rows (global vector, local arrays, image description) in this
    order, copied as stored. Returns its name."""
    by_segment: dict[str, list[int]] = {}
    for position, (segment, _) in enumerate(places):
        by_segment.setdefault(segment, []).append(position)
    globals_: np.ndarray | None = None
    arrays: dict[str, np.ndarray] = {}
    images: list = [None] * len(places)
    for segment, positions in by_segment.items():
        folder = segment_dir(index_dir, segment)
        meta = read_segment_meta(folder)
        if meta is None:
            raise IndexStoreError(f"segment {segment} is unreadable; run the build again with --full")
        rows = [places[p][1] for p in positions]
        files = SegmentFiles(folder)
        try:
            values, scales = files.read_stored(rows)
            descriptors = files.read_global()[rows]
        finally:
            files.close()
        if globals_ is None:
            globals_ = np.empty((len(places), *descriptors.shape[1:]), dtype=descriptors.dtype)
            arrays["local"] = np.empty((len(places), *values.shape[1:]), dtype=values.dtype)
            if scales is not None:
                arrays["scale"] = np.empty((len(places), *scales.shape[1:]), dtype=scales.dtype)
        globals_[positions] = descriptors
        arrays["local"][positions] = values
        if scales is not None:
            arrays["scale"][positions] = scales
        for p, row in zip(positions, rows, strict=True):
            images[p] = meta.images[row]
    if globals_ is None:
        raise ValueError("no rows to copy")
    segments_dir = index_dir / SEGMENTS
    segments_dir.mkdir(parents=True, exist_ok=True)
    return write_segment(segments_dir, identity, images, {"global": globals_, **arrays})
