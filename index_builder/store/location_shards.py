"""The files of a sharded version's location shards, beside its manifest:

    versions/v000007/shard-00.faiss      exact inner-product index over the shard's global descriptors
    versions/v000007/shard-00.ids.npy    (n,) int64: the version-wide id of each of its rows, ascending

Written into the version's staging directory, so they are published (or not) with the version.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from index_builder.errors import IndexStoreError
from index_builder.global_index import GlobalIndexConfig, build_global_index, read_global_index
from index_builder.global_index import write_global_index as write_faiss
from index_builder.sharding import Partition, ShardPlan


def index_file(key: str) -> str:
    return f"{key}.faiss"


def ids_file(key: str) -> str:
    return f"{key}.ids.npy"


def write_location_shards(
    version_dir: Path, partition: Partition, descriptors: np.ndarray, config: GlobalIndexConfig
) -> list[str]:
    """Each shard's index and ids into version_dir; returns the file names written."""
    written = []
    for k, shard in enumerate(partition.shards):
        ids = np.nonzero(partition.assignment == k)[0].astype(np.int64)
        np.save(version_dir / ids_file(shard.key), ids, allow_pickle=False)
        write_faiss(build_global_index(descriptors[ids], config), version_dir / index_file(shard.key))
        written += [ids_file(shard.key), index_file(shard.key)]
    return written


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
