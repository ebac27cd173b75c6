"""What an index directory holds: the published version, its build report, and whether it is intact.

`selavpr index status` exits with `status_exit_code`: 0 intact (or not verified), 1 a check failed (a
file missing, unreadable or changed; an unreadable manifest), 3 no published version to verify."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from index_builder.calibration import described, served_calibration
from index_builder.errors import IndexNotFound
from index_builder.manifest import IndexManifest
from index_builder.store import VERSIONS, build_running, current_version_name, version_names
from index_builder.store.integrity import verify_version


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
        "calibration": _calibration(index_dir, manifest),
    }
    if verify:
        status["verification"] = verify_version(index_dir, manifest).to_dict()
    return status


def _calibration(index_dir: Path, manifest: IndexManifest) -> dict[str, Any]:
    """The calibration the version answers with (identity, sample size, fit quality), or why none."""
    calibration, note = served_calibration(
        index_dir, manifest.calibration, manifest.encoding.fingerprint, manifest.calibration_note
    )
    return described(calibration, note)


EXIT_OK, EXIT_DAMAGED, EXIT_NO_INDEX = 0, 1, 3


def status_exit_code(status: dict[str, Any], verify: bool) -> int:
    """The exit status for `index status` (see the module's docstring)."""
    if "problem" in status:
        return EXIT_DAMAGED
    if not verify:
        return EXIT_OK
    if status["current_version"] is None:
        return EXIT_NO_INDEX
    return EXIT_OK if status["verification"]["ok"] else EXIT_DAMAGED
