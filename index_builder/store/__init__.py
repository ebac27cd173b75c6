"""The index on disk: immutable feature segments shared by versions, versions published by a pointer swap.
A sharded version's segments each belong to one location shard (shard_segments.py).

    INDEX_DIR/
      CURRENT                  the published version's name, replaced atomically
      versions/v000007/        manifest.json, global.faiss, meta.sqlite      (versions.py, metadata.py)
                               shard-00.faiss, .ids.npy, .rows.npy           (location_shards.py)
      segments/g-<id>/         meta.json, global.npy, local.npy, scale.npy   (segments.py, codec.py)
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
from index_builder.store.segments import (
    SEGMENT_FOLDERS,
    SEGMENTS,
    SegmentFiles,
    SegmentImage,
    read_segment_meta,
    segment_dir,
    write_segment,
)
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
    "SEGMENTS",
    "SEGMENT_FOLDERS",
    "VERSIONS",
    "BuildInProgress",
    "BuildLock",
    "ImageRecord",
    "IndexNotFound",
    "IndexStoreError",
    "IndexVersion",
    "SegmentFiles",
    "SegmentImage",
    "StoredMaps",
    "build_running",
    "collect_garbage",
    "current_version_name",
    "decode_local",
    "encode_local",
    "now_iso",
    "publish_version",
    "read_segment_meta",
    "remove_unfinished",
    "segment_dir",
    "sha256_file",
    "version_names",
    "write_segment",
]
