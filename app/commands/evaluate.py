"""`selavpr eval --dataset ROOT`: Recall@N, global and re-ranked, as the paper measures it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.commands.common import add_model_dtype_option, positive_int
from index_builder.evaluate import DEFAULT_RECALLS, EvalConfig, EvalReport, evaluate, plot_recalls
from index_builder.store import LOCAL_DTYPES


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="Recall@N on a benchmark split (VPR-datasets-downloader layout)")
    parser.add_argument(
        "--dataset", type=Path, required=True, help="ROOT with images/<split>/{database,queries}"
    )
    parser.add_argument("--split", default="test")
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--device", default="auto")
    add_model_dtype_option(parser)
    parser.add_argument("--rerank-k", type=positive_int, default=100)
    parser.add_argument(
        "--recalls", default=",".join(map(str, DEFAULT_RECALLS)), help="N values, comma-separated"
    )
    parser.add_argument("--threshold-m", type=float, default=25.0, help="positives within this distance")
    parser.add_argument(
        "--queries-list", type=Path, help="only these queries (e.g. the official MSLS-val 740)"
    )
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    parser.add_argument("--plot", type=Path, help="draw Recall@N curves to this PNG")
    parser.add_argument("--index-dir", type=Path, help="database index (default: a cache directory)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--precision", default="float32", help="MNN precision (default: exact float32)")
    parser.add_argument(
        "--local-dtype", choices=LOCAL_DTYPES, default="int8", help="stored database features"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = EvalConfig(
        dataset=args.dataset,
        split=args.split,
        checkpoint=args.checkpoint,
        device=args.device,
        rerank_k=args.rerank_k,
        recalls=[int(n) for n in args.recalls.split(",") if n.strip()],
        threshold_m=args.threshold_m,
        queries_list=args.queries_list,
        index_dir=args.index_dir,
        batch_size=args.batch_size,
        precision=args.precision,
        local_dtype=args.local_dtype,
        model_dtype=args.model_dtype,
    )
    report = evaluate(config)
    print(table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if args.plot:
        plot_recalls(report, args.plot)
    return 0


def table(report: EvalReport) -> str:
    ns = list(report.global_recalls)
    rows = [
        f"{report.dataset} [{report.split}]: {report.queries} queries, {report.database} database images, "
        f"{report.queries_without_positives} queries without a positive within {report.threshold_m:g} m",
        "stage      " + "".join(f"{'R@' + n:>9}" for n in ns),
        "global     " + "".join(f"{report.global_recalls[n]:9.2f}" for n in ns),
        "re-ranked  " + "".join(f"{report.reranked_recalls[n]:9.2f}" for n in ns),
    ]
    return "\n".join(rows)
