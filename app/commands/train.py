"""`selavpr train --dataset ROOT --out-dir DIR`: train adapters and the local head (spec section 6)."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.commands.common import positive_int, print_json
from index_builder.evaluate import EvalConfig, evaluate
from model.config import LocalMode
from model.extractor import FeatureExtractor
from model.selavpr import SelaVPR
from model.training.loop import TrainConfig, Validate, train
from model.weights.checkpoints import CheckpointInfo, LoadedModel
from model.weights.formats import CheckpointFormat
from model.weights.project_format import fingerprint


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train adapters and the local head with the MNN local loss")
    parser.add_argument(
        "--dataset", type=Path, required=True, help="ROOT with images/<split>/{database,queries}"
    )
    parser.add_argument("--out-dir", type=Path, required=True, help="writes last/, best/ and train_log.jsonl")
    parser.add_argument("--checkpoint", default="default", help="where to start (default: the offline ViT-S)")
    parser.add_argument("--resume", type=Path, help="an OUT/last directory to continue from")
    parser.add_argument("--split", default="train")
    parser.add_argument("--epochs", type=positive_int, default=50)
    parser.add_argument("--max-steps", type=positive_int, help="stop after this many optimiser steps")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="tuples (q, p, n1, n2) per step")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--lambda-local", type=float, default=1.0)
    parser.add_argument(
        "--patience", type=positive_int, default=3, help="epochs without R@5 gain before stopping"
    )
    parser.add_argument("--queries-per-epoch", type=positive_int, default=5000)
    parser.add_argument("--rerank-k", type=positive_int, default=100, help="for validation")
    parser.add_argument("--image-size", type=positive_int)
    parser.add_argument("--device", default="auto")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = TrainConfig(
        dataset=args.dataset,
        out_dir=args.out_dir,
        checkpoint=args.checkpoint,
        resume=args.resume,
        split=args.split,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lambda_local=args.lambda_local,
        patience=args.patience,
        queries_per_epoch=args.queries_per_epoch,
        image_size=args.image_size,
        device=args.device,
    )
    print_json(train(config, validator(config, args.rerank_k)))
    return 0


def validator(config: TrainConfig, rerank_k: int) -> Validate | None:
    """R@5 after re-ranking on the val split, when the dataset has one."""
    if not (config.dataset / "images" / "val").is_dir():
        return None

    def validate(model: SelaVPR, epoch: int) -> float:
        info = CheckpointInfo(
            source=f"{config.out_dir} (epoch {epoch})",
            format=CheckpointFormat.SELAVPR,
            description=f"training epoch {epoch}",
            fingerprint=fingerprint(model.state_dict()),
            trained_adapters=True,
            trained_local_head=True,
            image_size=config.image_size or 224,
        )
        extractor = FeatureExtractor(LoadedModel(model.eval(), info), local_mode=LocalMode.LOCAL_HEAD)
        report = evaluate(
            EvalConfig(
                config.dataset,
                "val",
                rerank_k=rerank_k,
                index_dir=config.out_dir / "val-index",
                grace_seconds=0,
            ),
            extractor=extractor,
            show_progress=False,
        )
        return report.reranked_recalls["5"]

    return validate
