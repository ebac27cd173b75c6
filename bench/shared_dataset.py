"""Lay the shared test images out as a benchmark dataset (VPR-datasets-downloader layout).

Place K of matching_triplets gets UTM east 1000 K metres: its views i0 and i1 go to the database, view i2
(offset a few metres) is the query, so positives within 25 m are exactly the place's other views.

    python -m bench.shared_dataset OUT_DIR [--splits test] [--query-view i2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.common import DEFAULT_SHARED


def make_dataset(
    root: Path,
    shared: Path = DEFAULT_SHARED,
    splits: Sequence[str] = ("test",),
    query_view: str = "i2",
    offset_m: float = 3.0,
) -> Path:
    for split in splits:
        for place_dir in sorted((shared / "matching_triplets").iterdir()):
            k = int(place_dir.name[1:])
            for view in ("i0", "i1", "i2"):
                src = next((place_dir / view).iterdir())
                east = 1000.0 * k + (offset_m if view == query_view else 0.0)
                part = "queries" if view == query_view else "database"
                dst = root / "images" / split / part / f"@{east:.2f}@0.00@55@H@@@{place_dir.name}_{view}@.jpg"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dst)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.shared_dataset", description=__doc__.split("\n")[0]
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--splits", default="test")
    parser.add_argument("--query-view", default="i2", choices=("i0", "i1", "i2"))
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED)
    args = parser.parse_args(argv)
    make_dataset(args.out_dir, args.shared_data, args.splits.split(","), args.query_view)
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
