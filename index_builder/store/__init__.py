"""The index on disk: immutable feature shards shared by versions, versions published by a pointer swap.

    INDEX_DIR/
      CURRENT                  the published version's name, replaced atomically
      versions/v000007/        manifest.json, global.faiss, meta.sqlite      (versions.py, metadata.py)
      shards/s-<id>/           meta.json, global.npy, local.npy, scale.npy   (shards.py, codec.py)
      .build.lock              held by the one build running                 (maintenance.py)

The manifest format lives in index_builder/manifest.py. Everything a caller needs is importable from here.
"""

from index_builder.errors import BuildInProgress, IndexNotFound, IndexStoreError
from index_builder.store.codec import DEFAULT_LOCAL_DTYPE, LOCAL_DTYPES, decode_local, encode_local
from index_builder.store.files import now_iso, sha256_file
from index_builder.store.maintenance import (
    DEFAULT_GRACE_SECONDS,
    LOCK,
    BuildLock,
    build_running,
    collect_garbage,
    remove_unfinished,
)
from index_builder.store.metadata import ImageRecord
from index_builder.store.segments import SHARDS, ShardFiles, ShardImage, read_shard_meta, write_shard
from index_builder.store.versions import (
    VERSIONS,
    IndexVersion,
    StoredMaps,
    current_version_name,
    publish_version,
    version_names,
)

__all__ = [
    "DEFAULT_GRACE_SECONDS",
    "DEFAULT_LOCAL_DTYPE",
    "LOCAL_DTYPES",
    "LOCK",
    "SHARDS",
    "VERSIONS",
    "BuildInProgress",
    "BuildLock",
    "ImageRecord",
    "IndexNotFound",
    "IndexStoreError",
    "IndexVersion",
    "ShardFiles",
    "ShardImage",
    "StoredMaps",
    "build_running",
    "collect_garbage",
    "current_version_name",
    "decode_local",
    "encode_local",
    "now_iso",
    "publish_version",
    "read_shard_meta",
    "remove_unfinished",
    "sha256_file",
    "version_names",
    "write_shard",
]
