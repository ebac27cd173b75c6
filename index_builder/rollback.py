"""Serving an earlier version again when the published one is damaged: `selavpr index rollback`.

Only a version whose every file (its own and its segments') verifies is taken; segments are shared between
versions, so a damaged segment can spoil the earlier versions too. The damaged version stays on disk
until the next build, which removes it like any version newer than CURRENT, and re-encodes what its
damaged segments held. Superseded versions stay `grace_seconds` after a publish (600 s by default):
rollback has something to go back to only within that time, or with a longer grace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from index_builder.errors import IndexNotFound, IndexStoreError
from index_builder.manifest import IndexManifest
from index_builder.store import VERSIONS, BuildLock, current_version_name, version_names
from index_builder.store.integrity import verify_version
from index_builder.store.versions import point_current, retire_versions


@dataclass
class Rollback:
    previous: str | None  # what CURRENT named before
    current: str  # what it names now
    rejected: dict[str, list[str]] = field(default_factory=dict)  # version -> its problems


def rollback(index_dir: Path, to: str | None = None) -> Rollback:
    """Point CURRENT at `to`, or at the newest version older than the published one that verifies.
    IndexStoreError when there is none (nothing changes then). Holds the build lock meanwhile."""
    with BuildLock(index_dir):
        published = current_version_name(index_dir)
        if to is not None:
            candidates = [to] if to in version_names(index_dir) else []
            if not candidates:
                raise IndexStoreError(f"no version {to} in the index folder")
        else:
            candidates = [n for n in reversed(version_names(index_dir)) if published is None or n < published]
        rejected: dict[str, list[str]] = {}
        for name in candidates:
            problems = _problems(index_dir, name)
            if not problems:
                retire_versions(index_dir, [n for n in version_names(index_dir) if n > name])
                point_current(index_dir, name)
                return Rollback(published, name, rejected)
            rejected[name] = problems
    detail = "; ".join(f"{name}: {problems[0]}" for name, problems in rejected.items())
    raise IndexStoreError(
        "no intact earlier version to roll back to"
        + (f" ({detail})" if detail else "")
        + "; rebuild the index (`selavpr index build --full`)"
    )


def _problems(index_dir: Path, name: str) -> list[str]:
    try:
        manifest = IndexManifest.read(index_dir / VERSIONS / name)
    except IndexNotFound as exc:
        return [str(exc)]
    return verify_version(index_dir, manifest).problems
