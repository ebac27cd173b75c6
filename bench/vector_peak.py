"""Benchmark: what this CPU's vector units allow for the re-ranking kernels' inner loops.

Builds bench/vector_peak.c with the system C compiler and runs each loop (float32 FMA, the AVX2 int8
sequence of model/matching/_mnn_cpu.c, AVX-VNNI where present) on one thread and on every core, with
operands in L1: no reductions and no memory traffic, so no kernel built from these instructions can
beat these rates. Prints the rates and the seconds of products per query at K candidates of
61x61x128 maps that they imply. Prints one JSON document.

    python -m bench.vector_peak [--seconds 1] [--k 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import emit, machine

SOURCE = Path(__file__).with_name("vector_peak.c")
MAP_POSITIONS, CHANNELS = 61 * 61, 128


def build(directory: Path) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("vector_peak: no C compiler (cc) on PATH")
    binary = directory / "vector_peak"
    subprocess.run([compiler, "-O3", "-pthread", "-o", str(binary), str(SOURCE)], check=True)
    return binary


def rates(binary: Path, threads: int, seconds: float) -> dict[str, float | None]:
    """GMAC/s per loop on `threads` threads at once; None where the CPU lacks its instructions."""
    command = [str(binary), str(threads), str(seconds)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    found = {}
    for line in out.stdout.splitlines():
        name, _, value = line.rpartition(" ")
        if name:
            found[name] = None if value == "-" else float(value)
    return found


def run(args: argparse.Namespace) -> dict:
    cores = os.cpu_count() or 1
    report = {"machine": machine(torch.device("cpu")), "K": args.k, "map": [61, 61, CHANNELS]}
    with tempfile.TemporaryDirectory() as tmp:
        binary = build(Path(tmp))
        one, every = rates(binary, 1, args.seconds), rates(binary, cores, args.seconds)
    products = args.k * MAP_POSITIONS**2 * CHANNELS
    report["loops"] = {
        name: {
            "gmacs_one_thread": one[name],
            f"gmacs_{cores}_threads": every[name],
            "products_s_per_query": round(products / (every[name] * 1e9), 3) if every[name] else None,
        }
        for name in one
    }
    emit(report, args.out)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.vector_peak", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per loop and thread count")
    parser.add_argument("--k", type=int, default=100, help="candidates per query for the seconds printed")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
