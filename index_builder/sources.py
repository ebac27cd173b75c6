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


def scan_references(root: Path, skipped: list[tuple[str, str]] | None = None) -> list[ReferenceImage]:
    """Every image under root (hidden files and folders skipped), sorted by relative path.

    A symlink that is broken or leads outside root, or a file that cannot be read, is left out and
    appended to `skipped` as (relative path, reason): one bad entry never fails a build."""
    if not root.is_dir():
        raise SelavprError(f"references folder {root} does not exist or is not a folder")
    real_root = root.resolve()
    images = []
    for dirpath, dirnames, filenames in os.walk(root):  # never into symlinked folders (followlinks=False)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            rel = PurePosixPath(path.relative_to(root).as_posix())
            problem = _unusable(path, real_root)
            if problem is not None:
                log.warning("skipping reference %s: %s", rel, problem)
                if skipped is not None:
                    skipped.append((str(rel), problem))
                continue
            stat = path.stat()
            images.append(ReferenceImage(str(rel), path, stat.st_size, stat.st_mtime_ns))
    return sorted(images, key=lambda image: image.rel_path)


def _unusable(path: Path, real_root: Path) -> str | None:
    """Why a scanned file cannot be a reference, or None."""
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return "broken symlink"
        if not target.is_relative_to(real_root):
            return "symlink leads outside the references folder"
    try:
        if not path.stat().st_mode & 0o444 or not path.is_file():
            return "not a readable regular file"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    return None


def content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
