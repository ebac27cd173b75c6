"""What an index directory holds: the published version, its build report, and whether it is intact."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from index_builder.errors import IndexNotFound
from index_builder.manifest import IndexManifest
from index_builder.store import (
    VERSIONS,
    build_running,
    current_version_name,
    segment_dir,
    sha256_file,
    version_names,
)


def index_status(index_dir: Path, verify: bool = False) -> dict[str, Any]:
    """The JSON `selavpr index status` prints."""
    name = current_version_name(index_dir)
    status: dict[str, Any] = {
        "index_dir": str(index_dir),
        "current_version": name,
        "versions": version_names(index_dir),
        "build_running": build_running(index_dir),
    }
    if name is None:
        return status
    try:
        manifest = IndexManifest.read(index_dir / VERSIONS / name)
    except IndexNotFound as exc:
        return status | {"problem": str(exc)}
    report = manifest.report
    status |= {
        "created_at": manifest.created_at,
        "num_images": manifest.count,
        "with_location": report.with_location if report else None,
        "encoding": manifest.encoding.to_dict(),
        "checkpoint": asdict(manifest.checkpoint),
        "global_index": manifest.global_index.to_dict(),
        "segments": len(manifest.segments),
        "location_shards": [
            {"key": s.key, "count": s.count, "located": s.located} for s in manifest.location_shards
        ],
        "last_report": asdict(report) if report else None,
    }
    if verify:
        status["verification"] = verify_version(index_dir, manifest)
    return status


def verify_version(index_dir: Path, manifest: IndexManifest) -> dict[str, Any]:
    """Recompute every checksum the manifest and its segments record."""
    problems = []
    expected = {index_dir / VERSIONS / manifest.version / f: h for f, h in manifest.files.items()}
    for segment in manifest.segments:
        expected |= {segment_dir(index_dir, segment.name) / f: h for f, h in segment.files.items()}
    for path, digest in expected.items():
        if not path.is_file():
            problems.append(f"missing {path.relative_to(index_dir)}")
        elif sha256_file(path) != digest:
            problems.append(f"checksum mismatch {path.relative_to(index_dir)}")
    return {"ok": not problems, "files_checked": len(expected), "problems": problems}
