"""The files of a sharded version's location shards, beside its manifest:

    versions/v000007/shard-00.faiss      exact inner-product index over the shard's global descriptors
    versions/v000007/shard-00.ids.npy    (n,) int64: the version-wide id of each of its rows, ascending
    versions/v000007/shard-00.rows.npy   (n, 2) int64: where each of those references' maps are: the
                                         position of its segment in the shard's manifest entry, its row

Written into the version's staging directory, so they are published (or not) with the version and
checksummed in its manifest. With the id table, a shard's server reads neither the version-wide id map
(meta.sqlite) nor another shard's files; versions written before it existed have no rows file (their
shards share the version's segments) and are served from meta.sqlite.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from index_builder.errors import IndexStoreError
from index_builder.global_index import GlobalIndexConfig, build_global_index, read_global_index
from index_builder.global_index import write_global_index as write_faiss
from index_builder.sharding import Partition, ShardPlan
from index_builder.store.metadata import ImageRecord


def index_file(key: str) -> str:
    return f"{key}.faiss"


def ids_file(key: str) -> str:
    return f"{key}.ids.npy"


def rows_file(key: str) -> str:
    return f"{key}.rows.npy"


def write_location_shards(
    version_dir: Path,
    partition: Partition,
    descriptors: np.ndarray,
    config: GlobalIndexConfig,
    records: Sequence[ImageRecord],
) -> list[str]:
    """Each shard's index, ids and (for a shard owning its segments) id table into version_dir; returns
    the file names written."""
    written = []
    for k, shard in enumerate(partition.shards):
        ids = np.nonzero(partition.assignment == k)[0].astype(np.int64)
        np.save(version_dir / ids_file(shard.key), ids, allow_pickle=False)
        write_faiss(build_global_index(descriptors[ids], config), version_dir / index_file(shard.key))
        written += [ids_file(shard.key), index_file(shard.key)]
        if shard.owns_files:
            np.save(version_dir / rows_file(shard.key), _rows_table(shard, ids, records), allow_pickle=False)
            written.append(rows_file(shard.key))
    return written


def _rows_table(shard: ShardPlan, ids: np.ndarray, records: Sequence[ImageRecord]) -> np.ndarray:
    position = {name: i for i, name in enumerate(shard.segments)}
    table = np.empty((len(ids), 2), dtype=np.int64)
    for i, ref_id in enumerate(ids.tolist()):
        record = records[ref_id]
        if record.segment not in position:
            raise ValueError(f"reference {ref_id} is not in a segment of {shard.key}")
        table[i] = (position[record.segment], record.row)
    return table


@dataclass
class ShardRows:
    """A location shard's own id table: where its references' maps are."""

    ids: np.ndarray  # (n,) int64 version-wide ids, ascending
    segment: np.ndarray  # (n,) int64 position in `segments` of the segment holding each
    row: np.ndarray  # (n,) int64 its row there
    segments: tuple[str, ...]


def read_shard_rows(version_dir: Path, shard: ShardPlan, count: int) -> ShardRows:
    """A shard's ids and id table (a version of `count` references); IndexStoreError when they are
    missing, unreadable or do not fit together."""
    damaged = f"{version_dir.name}: location shard {shard.key} is damaged"
    try:
        ids = np.load(version_dir / ids_file(shard.key), allow_pickle=False)
        table = np.load(version_dir / rows_file(shard.key), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise IndexStoreError(f"{damaged} ({type(exc).__name__})") from None
    fits = (
        ids.ndim == 1
        and len(ids) == shard.count
        and table.shape == (len(ids), 2)
        and np.issubdtype(ids.dtype, np.integer)
        and np.issubdtype(table.dtype, np.integer)
    )
    if not fits:
        raise IndexStoreError(f"{version_dir.name}: location shard {shard.key} does not match its manifest")
    ids, segment, row = ids.astype(np.int64), table[:, 0].astype(np.int64), table[:, 1].astype(np.int64)
    in_range = (
        (len(ids) == 0 or (ids.min() >= 0 and ids.max() < count))
        and ((segment >= 0) & (segment < len(shard.segments))).all()
        and (row >= 0).all()
    )
    if not in_range:
        raise IndexStoreError(f"{damaged} (id table out of range)")
    return ShardRows(ids, segment, row, shard.segments)


def read_location_shard(
    version_dir: Path, shard: ShardPlan, config: GlobalIndexConfig
) -> tuple[faiss.Index, np.ndarray]:
    """One shard's (index, ids); IndexStoreError when they are missing or disagree."""
    try:
        ids = np.load(version_dir / ids_file(shard.key), allow_pickle=False)
        index = read_global_index(version_dir / index_file(shard.key), config)
    except (OSError, ValueError, RuntimeError) as exc:  # faiss raises RuntimeError
        raise IndexStoreError(
            f"{version_dir.name}: location shard {shard.key} is damaged ({type(exc).__name__})"
        ) from None
    if ids.ndim != 1 or len(ids) != shard.count or index.ntotal != shard.count:
        raise IndexStoreError(f"{version_dir.name}: location shard {shard.key} does not match its manifest")
    return index, ids.astype(np.int64)
