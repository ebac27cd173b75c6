"""What an index directory holds: the published version, its build report, and whether it is intact."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from index_builder.store import LOCK, SHARDS, VERSIONS, current_version_name, sha256_file, version_names


def index_status(index_dir: Path, verify: bool = False) -> dict[str, Any]:
    name = current_version_name(index_dir)
    status: dict[str, Any] = {
        "index_dir": str(index_dir),
        "current_version": name,
        "versions": version_names(index_dir),
        "build_running": build_running(index_dir),
    }
    if name is None:
        return status
    manifest = json.loads((index_dir / VERSIONS / name / "manifest.json").read_text())
    report = manifest.get("report", {})
    status |= {
        "created_at": manifest["created_at"],
        "num_images": manifest["count"],
        "with_location": report.get("with_location"),
        "encoding": manifest["encoding"],
        "checkpoint": manifest["checkpoint"],
        "global_index": manifest["global_index"],
        "shards": len(manifest["shards"]),
        "last_report": report,
    }
    if verify:
        status["verification"] = verify_version(index_dir, manifest)
    return status


def verify_version(index_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Recompute every checksum the manifest and its shards record."""
    problems = []
    expected = {index_dir / VERSIONS / manifest["version"] / f: h for f, h in manifest["files"].items()}
    for shard in manifest["shards"]:
        expected |= {index_dir / SHARDS / shard["name"] / f: h for f, h in shard["files"].items()}
    for path, digest in expected.items():
        if not path.is_file():
            problems.append(f"missing {path.relative_to(index_dir)}")
        elif sha256_file(path) != digest:
            problems.append(f"checksum mismatch {path.relative_to(index_dir)}")
    return {"ok": not problems, "files_checked": len(expected), "problems": problems}


def build_running(index_dir: Path) -> bool:
    """Whether a build holds the lock (probed with a shared lock, released at once; a build starting in
    that instant retries)."""
    path = index_dir / LOCK
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
