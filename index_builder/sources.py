"""Reference images on disk: scanning a references folder and hashing contents.

Where each image was taken is read by index_builder/locations.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from model.errors import SelavprError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif"})
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ReferenceImage:
    rel_path: str  # POSIX path relative to the references folder
    abs_path: Path
    file_size: int
    mtime_ns: int


def scan_references(root: Path) -> list[ReferenceImage]:
    """Every image under root (hidden files and folders skipped), sorted by relative path."""
    if not root.is_dir():
        raise SelavprError(f"references folder {root} does not exist or is not a folder")
    images = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            stat = path.stat()
            rel = PurePosixPath(path.relative_to(root).as_posix())
            images.append(ReferenceImage(str(rel), path, stat.st_size, stat.st_mtime_ns))
    return sorted(images, key=lambda image: image.rel_path)


def content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
