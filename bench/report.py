"""Render a bench/rerank.py JSON report as the Markdown tables of docs/benchmarks.md.

python -m bench.report results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def synthetic_table(rows: list[dict]) -> list[str]:
    lines = [
        "| local maps | K | method | precision | median ms | min ms | speed-up | peak MiB beyond inputs "
        "| counts = float32 | max abs diff | top-1 = float32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        side, _, channels = r["map"]
        head = f"| {side}x{side}x{channels} | {r['K']} "
        if r["method"] == "full_tensor":
            cells = [
                "full tensor (authors)",
                r["precision"],
                f"{r['median_ms']:.0f}",
                f"{r['min_ms']:.0f}",
                "1x",
            ]
            cells += [f"{r['peak_extra_mib']:.0f}", "-", "-", "-"]
        else:
            cells = [
                "engine",
                r["precision"],
                f"{r['median_ms']:.0f}",
                f"{r['min_ms']:.0f}",
                f"{r['speedup']:.1f}x",
            ]
            cells += [
                f"{r['peak_extra_mib']:.0f}",
                f"{100 * r['counts_identical']:.0f}%",
                str(r["max_abs_diff"]),
            ]
            cells += ["yes" if r["top1_same"] else "no"]
        lines.append(head + "| " + " | ".join(cells) + " |")
    return lines


def real_table(rows: list[dict]) -> list[str]:
    lines = [
        "| real maps | queries x candidates | precision | top-1 = float32 | counts = float32 "
        "| max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['queries']} x {r['candidates_per_query']} | {r['precision']} "
            f"| {100 * r['top1_unchanged']:.0f}% | {100 * r['counts_identical']:.0f}% | {r['max_abs_diff']} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    report = json.loads(Path(args[0]).read_text())
    m = report["machine"]
    print(f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, device {m['device']}.\n")
    print("\n".join(synthetic_table(report["synthetic"])))
    if report.get("real"):
        print()
        print("\n".join(real_table(report["real"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
