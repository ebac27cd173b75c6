"""Named checkpoints on disk: fetched once, checked before they count as cached, checked again on each load.

Layout, under `cache_dir()/weights/<name>/`:
- `<filename>`: the checkpoint, present only once it passed every check;
- `download.json`: its record (source, size, sha256 and where that hash came from, fingerprint);
- `<filename>.part` (+ `.part.json`): an interrupted download, kept only so that the next fetch resumes it.
  It is never loaded. A refused file (wrong size or hash, or refused by the loader) is deleted instead.
A connection that cannot be made at all writes nothing. Concurrent fetches of one name wait on a lock
(`weights/.locks/<name>.lock`).

Checks before a file is cached: the byte count announced by the server, the registry's size and sha256
where it has them, then the safe loader (model.weights.checkpoints.load_checkpoint: no arbitrary unpickling, a
known layout, consistent shapes) and the format the registry expects. Where the registry has no sha256 the
first download's is recorded, and every later load compares the file against it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from model.errors import CheckpointError, DownloadError
from model.weights.cache import cache_dir
from model.weights.checkpoints import load_checkpoint
from model.weights.download import download
from model.weights.registry import RegistryEntry

log = logging.getLogger(__name__)

MIRROR_ENV = "SELAVPR_MIRROR_URL"
RECORD_FILE = "download.json"
SHA256_FROM_REGISTRY = "registry"
SHA256_FROM_FIRST_DOWNLOAD = "first download"


@dataclass(frozen=True)
class DownloadRecord:
    name: str
    filename: str
    source: str  # the URL it came from, or the local file it was imported from
    size_bytes: int
    sha256: str
    sha256_source: str  # SHA256_FROM_REGISTRY or SHA256_FROM_FIRST_DOWNLOAD
    fingerprint: str  # over the tensors (model.weights.project_format.fingerprint)
    fetched_at: str

    @classmethod
    def read(cls, path: Path) -> DownloadRecord:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: unreadable download record ({exc})") from None


@dataclass(frozen=True)
class CachedCheckpoint:
    path: Path
    record: DownloadRecord


def weights_root() -> Path:
    return cache_dir() / "weights"


def entry_dir(entry: RegistryEntry) -> Path:
    return weights_root() / entry.name


def part_path(entry: RegistryEntry) -> Path:
    return entry_dir(entry) / f"{entry.filename}.part"


def mirror_url(explicit: str | None = None) -> str | None:
    """The mirror base URL: the flag, else $SELAVPR_MIRROR_URL, else none (the original hosts)."""
    return explicit or os.environ.get(MIRROR_ENV) or None


def find_cached(entry: RegistryEntry) -> CachedCheckpoint | None:
    """The cached file and its record when both are there (nothing is hashed: for listings)."""
    path, record = entry_dir(entry) / entry.filename, entry_dir(entry) / RECORD_FILE
    if not (path.is_file() and record.is_file()):
        return None
    return CachedCheckpoint(path, DownloadRecord.read(record))


def verify_cached(entry: RegistryEntry) -> CachedCheckpoint:
    """Hash the cached file and compare it with the registry's sha256, else the one recorded at download."""
    cached = find_cached(entry)
    if cached is None:
        raise CheckpointError(
            f"{entry.name} is not cached; fetch it with: selavpr weights fetch {entry.name}"
        )
    expected = entry.sha256 or cached.record.sha256
    source = SHA256_FROM_REGISTRY if entry.sha256 else f"sha256 recorded at its {SHA256_FROM_FIRST_DOWNLOAD}"
    digest = sha256_of(cached.path)
    if digest != expected:
        raise CheckpointError(
            f"{cached.path}: sha256 {digest} differs from the {source} ({expected}); the cached file "
            f"changed after it was checked. Fetch it again with: selavpr weights fetch {entry.name} --force"
        )
    if not entry.sha256:
        log.info(
            "%s: sha256 matches the one recorded at its first download (the registry has none)", entry.name
        )
    return cached


def ensure_cached(entry: RegistryEntry, mirror: str | None = None, progress: bool = True) -> Path:
    """The verified local file of a named checkpoint, fetched first when it is not cached."""
    if find_cached(entry) is not None:
        return verify_cached(entry).path
    return fetch(entry, mirror=mirror, progress=progress).path


def fetch(
    entry: RegistryEntry,
    *,
    mirror: str | None = None,
    force: bool = False,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 30.0,
) -> CachedCheckpoint:
    """Download (resuming a .part), check and cache a named checkpoint; a cached one is only re-verified."""
    with _lock(entry):
        if not force and find_cached(entry) is not None:
            return verify_cached(entry)
        url = entry.source_url(mirror_url(mirror))
        log.info("fetching %s from %s", entry.name, url)
        try:
            outcome = download(
                url, part_path(entry), label=entry.name, progress=progress, retries=retries, timeout=timeout
            )
        except DownloadError as exc:
            raise DownloadError(f"{exc}. {_ways_around(entry)}") from None
        if outcome.resumed_from:
            log.info("%s: resumed from byte %d", entry.name, outcome.resumed_from)
        return _install(entry, outcome.part, source=url)


def _ways_around(entry: RegistryEntry) -> str:
    return (
        f"A file: --checkpoint FILE, or `selavpr weights fetch {entry.name} --file FILE` to cache it; "
        f"a mirror: ${MIRROR_ENV} or --mirror URL, serving <URL>/{entry.filename}"
    )


def import_file(entry: RegistryEntry, source: Path) -> CachedCheckpoint:
    """Cache a file downloaded elsewhere under its name, with the same checks as a download."""
    source = Path(source).expanduser()
    if not source.is_file():
        raise CheckpointError(f"{source}: no such file")
    with _lock(entry):
        part = part_path(entry)
        part.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, part)
        return _install(entry, part, source=str(source.resolve()))


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _install(entry: RegistryEntry, part: Path, source: str) -> CachedCheckpoint:
    """Check a complete part; cache it (record, then an atomic rename) or delete it and say why."""
    size = part.stat().st_size
    if entry.size_bytes is not None and size != entry.size_bytes:
        _discard(part)
        raise DownloadError(
            f"{entry.name}: got {size} bytes, the registry expects {entry.size_bytes}; refused, not cached"
        )
    digest = sha256_of(part)
    if entry.sha256 and digest != entry.sha256:
        _discard(part)
        raise DownloadError(
            f"{entry.name}: sha256 {digest} differs from the registry's {entry.sha256}; refused, not cached"
        )
    staging = part.with_name(f".verify-{os.getpid()}-{entry.filename}")  # keeps the suffix the loader reads
    part.rename(staging)
    try:
        fingerprint = _loader_check(entry, staging)
        record = DownloadRecord(
            name=entry.name,
            filename=entry.filename,
            source=source,
            size_bytes=size,
            sha256=digest,
            sha256_source=SHA256_FROM_REGISTRY if entry.sha256 else SHA256_FROM_FIRST_DOWNLOAD,
            fingerprint=fingerprint,
            fetched_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        _write_record(entry_dir(entry) / RECORD_FILE, record)
        final = entry_dir(entry) / entry.filename
        staging.rename(final)
    finally:
        staging.unlink(missing_ok=True)
    log.info("%s: cached at %s (sha256 %s, from the %s)", entry.name, final, digest, record.sha256_source)
    return CachedCheckpoint(final, record)


def _loader_check(entry: RegistryEntry, path: Path) -> str:
    """The safe loader must accept the file, and find the layout the registry promises."""
    try:
        info = load_checkpoint(path).info
    except CheckpointError as exc:
        raise CheckpointError(f"{entry.name}: the downloaded file was refused, not cached: {exc}") from None
    if info.format != entry.format:
        raise CheckpointError(
            f"{entry.name}: the downloaded file is a '{info.format}' checkpoint, the registry expects "
            f"'{entry.format}'; refused, not cached"
        )
    return info.fingerprint


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    part.with_name(part.name + ".json").unlink(missing_ok=True)


def _write_record(path: Path, record: DownloadRecord) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(record), indent=2) + "\n")
    tmp.replace(path)


@contextmanager
def _lock(entry: RegistryEntry) -> Iterator[None]:
    locks = weights_root() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{entry.name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another process is fetching it; waiting", entry.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
