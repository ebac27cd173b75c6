"""Whether stored files still hold what was written: every file's SHA-256 against the manifest's.

A version's own files are listed in its manifest, its segments' files in the segments' entries there, so
a version verifies without trusting anything it has not checksummed. Reads can be held to a rate, so
that a server verifying what it serves does not take the disk from its queries.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from index_builder.manifest import IndexManifest
from index_builder.store.segments import segment_dir
from index_builder.store.versions import VERSIONS

CHUNK_BYTES = 1 << 20


class Throttle:
    """At most `bytes_per_s` on average (None: no limit); `consume` sleeps to keep to it."""

    def __init__(self, bytes_per_s: float | None, stop: threading.Event | None = None) -> None:
        self.bytes_per_s, self.stop = bytes_per_s, stop
        self.started, self.consumed = time.monotonic(), 0

    def consume(self, count: int) -> None:
        self.consumed += count
        if not self.bytes_per_s:
            return
        ahead = self.consumed / self.bytes_per_s - (time.monotonic() - self.started)
        if ahead > 0:
            if self.stop is not None:
                self.stop.wait(ahead)
            else:
                time.sleep(ahead)

    @property
    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()


class VerificationStopped(Exception):
    """The throttle's stop event was set part-way."""


@dataclass
class Verification:
    """One pass over a version. `problems` name files relative to the index folder."""

    version: str
    ok: bool = True
    files_checked: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    damaged_segments: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_throttled(path: Path, throttle: Throttle | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            if throttle is not None:
                throttle.consume(len(chunk))
                if throttle.stopped:
                    raise VerificationStopped
    return digest.hexdigest()


def check_file(path: Path, digest: str, throttle: Throttle | None = None) -> str | None:
    """None when the file holds `digest`; otherwise what is wrong (missing, unreadable, changed)."""
    if not path.is_file():
        return "missing"
    try:
        actual = sha256_throttled(path, throttle)
    except OSError as exc:
        return f"unreadable ({exc.strerror or type(exc).__name__})"
    return None if actual == digest else "checksum mismatch"


def files_intact(folder: Path, files: dict[str, str]) -> bool:
    """Every named file in `folder` holds its recorded checksum (read at full speed)."""
    return all(check_file(folder / name, digest) is None for name, digest in files.items())


def verify_version(
    index_dir: Path,
    manifest: IndexManifest,
    throttle: Throttle | None = None,
    on_file: Callable[[str], None] | None = None,
) -> Verification:
    """Recompute every checksum the manifest and its segments record. VerificationStopped when the
    throttle's stop event is set part-way."""
    started = time.monotonic()
    result = Verification(version=manifest.version)
    expected = [(f"{VERSIONS}/{manifest.version}/{f}", h, None) for f, h in manifest.files.items()]
    for segment in manifest.segments:
        folder = segment_dir(Path(), segment.name).as_posix()
        expected += [(f"{folder}/{f}", h, segment.name) for f, h in segment.files.items()]
    for relative, digest, segment_name in expected:
        path = index_dir / relative
        problem = check_file(path, digest, throttle)
        result.files_checked += 1
        if problem is None:
            result.bytes_checked += path.stat().st_size
        else:
            result.problems.append(f"{problem} {relative}")
            if segment_name is not None and segment_name not in result.damaged_segments:
                result.damaged_segments.append(segment_name)
        if on_file is not None:
            on_file(relative)
    result.ok = not result.problems
    result.seconds = round(time.monotonic() - started, 3)
    return result
