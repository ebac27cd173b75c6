"""Benchmark datasets in the VPR-datasets-downloader layout (spec sections 6 and 7).

    ROOT/images/<split>/database/**/@UTM_east@UTM_north@zone@band@lat@lon@...@.jpg
    ROOT/images/<split>/queries/**/@...@.jpg

Only fields 1 and 2 of the '@'-split file name (UTM east, north in metres) are read; the rest may be
empty. Images are listed sorted, as the authors list them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.errors import SelavprError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DatasetError(SelavprError):
    pass


def utm_of(path: Path) -> tuple[float, float]:
    fields = path.name.split("@")
    try:
        return float(fields[1]), float(fields[2])
    except (IndexError, ValueError):
        raise DatasetError(f"{path}: file name has no @UTM_east@UTM_north@ fields") from None


@dataclass
class VPRSplit:
    root: Path
    split: str
    database_paths: list[Path]
    queries_paths: list[Path]
    database_utm: np.ndarray  # (N, 2) float64
    queries_utm: np.ndarray  # (Q, 2)

    @property
    def database_dir(self) -> Path:
        return self.root / "images" / self.split / "database"

    @classmethod
    def load(cls, root: str | Path, split: str, queries_list: Path | None = None) -> VPRSplit:
        root = Path(root)
        base = root / "images" / split
        lists = {}
        for part in ("database", "queries"):
            folder = base / part
            if not folder.is_dir():
                raise DatasetError(
                    f"{folder} does not exist (expected ROOT/images/<split>/{{database,queries}})"
                )
            lists[part] = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        queries = lists["queries"]
        if queries_list is not None:
            queries = _restrict(queries, queries_list, base / "queries")
        if not lists["database"] or not queries:
            raise DatasetError(f"{base}: no database or no query images")
        return cls(
            root=root,
            split=split,
            database_paths=lists["database"],
            queries_paths=queries,
            database_utm=np.array([utm_of(p) for p in lists["database"]], dtype=np.float64),
            queries_utm=np.array([utm_of(p) for p in queries], dtype=np.float64),
        )

    def positives(self, radius_m: float) -> list[np.ndarray]:
        """Per query, the sorted database indices within radius_m metres (UTM east/north)."""
        return within(self.queries_utm, self.database_utm, radius_m)


def within(points: np.ndarray, references: np.ndarray, radius_m: float) -> list[np.ndarray]:
    """For each point, the sorted indices of the references at most radius_m away (2-D, metres).
    References are sorted by easting once; each point then checks only the band east +- radius."""
    references = np.asarray(references, dtype=np.float64).reshape(-1, 2)
    order = np.argsort(references[:, 0], kind="stable")
    east = references[order, 0]
    out = []
    for x, y in np.asarray(points, dtype=np.float64).reshape(-1, 2):
        lo = int(np.searchsorted(east, x - radius_m, side="left"))
        hi = int(np.searchsorted(east, x + radius_m, side="right"))
        band = order[lo:hi]
        d2 = (references[band, 0] - x) ** 2 + (references[band, 1] - y) ** 2
        out.append(np.sort(band[d2 <= radius_m**2]).astype(np.int64))
    return out


def _restrict(queries: list[Path], listing: Path, folder: Path) -> list[Path]:
    """Keep the queries named in a file, one per line, by file name or by path relative to the folder."""
    wanted = {line.strip() for line in listing.read_text().splitlines() if line.strip()}
    kept = [q for q in queries if q.name in wanted or q.relative_to(folder).as_posix() in wanted]
    if len(kept) < len(wanted):
        raise DatasetError(f"{listing}: {len(wanted) - len(kept)} listed queries are not in {folder}")
    return kept
