"""`selavpr eval --dataset ROOT`: Recall@N, global and re-ranked, as the paper measures it; with
`--feature-blocks`, once per feature block, to choose the block on one's own data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.commands.common import (
    add_feature_block_option,
    add_model_options,
    feature_block,
    model_options,
    positive_int,
)
from index_builder.evaluate import (
    DEFAULT_RECALLS,
    EvalConfig,
    EvalReport,
    evaluate,
    evaluate_feature_blocks,
    plot_recalls,
)
from index_builder.store import DEFAULT_LOCAL_DTYPE, LOCAL_DTYPES
from model.config import FeatureBlock


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="Recall@N on a benchmark split (VPR-datasets-downloader layout)")
    parser.add_argument(
        "--dataset", type=Path, required=True, help="ROOT with images/<split>/{database,queries}"
    )
    parser.add_argument("--split", default="test")
    add_model_options(parser, feature_block_option=False)  # every model option `index build` takes
    blocks = parser.add_mutually_exclusive_group()
    add_feature_block_option(blocks)
    blocks.add_argument(
        "--feature-blocks",
        type=feature_blocks,
        default=None,
        metavar="N,N,...",
        help="sweep: evaluate each block (e.g. 4,6,8,11,final), each with its own cached database index",
    )
    parser.add_argument("--rerank-k", type=positive_int, default=100)
    parser.add_argument(
        "--recalls", default=",".join(map(str, DEFAULT_RECALLS)), help="N values, comma-separated"
    )
    parser.add_argument("--threshold-m", type=float, default=25.0, help="positives within this distance")
    parser.add_argument(
        "--queries-list", type=Path, help="only these queries (e.g. the official MSLS-val 740)"
    )
    parser.add_argument(
        "--place-removed",
        action="store_true",
        help="also answer each query with its true places left out of the database: the share rejected at "
        "the probability giving 95%% precision on the normal run",
    )
    parser.add_argument("--out", type=Path, help="write the results JSON here (with PR curves, reliability)")
    parser.add_argument("--plot", type=Path, help="draw Recall@N curves to this PNG (not with a sweep)")
    parser.add_argument("--index-dir", type=Path, help="database index (default: a cache directory)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--precision", default="float32", help="MNN precision (default: exact float32)")
    parser.add_argument(
        "--local-dtype", choices=LOCAL_DTYPES, default=DEFAULT_LOCAL_DTYPE, help="stored database features"
    )
    parser.set_defaults(run=run)


def feature_blocks(text: str) -> list[FeatureBlock]:
    blocks = [feature_block(part) for part in text.split(",") if part.strip()]
    if not blocks:
        raise argparse.ArgumentTypeError("expected block indices and/or 'final', comma-separated")
    return list(dict.fromkeys(blocks))  # each once, in the order given


def run(args: argparse.Namespace) -> int:
    config = EvalConfig(
        dataset=args.dataset,
        split=args.split,
        model=model_options(args),
        rerank_k=args.rerank_k,
        recalls=[int(n) for n in args.recalls.split(",") if n.strip()],
        threshold_m=args.threshold_m,
        queries_list=args.queries_list,
        index_dir=args.index_dir,
        batch_size=args.batch_size,
        precision=args.precision,
        local_dtype=args.local_dtype,
        place_removed=args.place_removed,
    )
    if args.feature_blocks is not None:
        return run_sweep(args, config)
    report = evaluate(config)
    print(table(report))
    if args.out:
        write_json(args.out, report.to_dict())
    if args.plot:
        plot_recalls(report, args.plot)
    return 0


def run_sweep(args: argparse.Namespace, config: EvalConfig) -> int:
    if args.plot:
        raise ValueError("--plot draws one evaluation; leave it out with --feature-blocks")
    reports = evaluate_feature_blocks(config, args.feature_blocks)
    for report in reports:
        print(table(report), end="\n\n")
    print(sweep_table(reports))
    if args.out:
        write_json(args.out, {"feature_blocks": [r.to_dict() for r in reports]})
    return 0


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def table(report: EvalReport) -> str:
    ns = list(report.global_recalls)
    rows = [
        f"{report.dataset} [{report.split}]: {report.queries} queries, {report.database} database images, "
        f"{report.queries_without_positives} queries without a positive within {report.threshold_m:g} m",
        f"feature block {report.feature_block}, local mode {report.local_mode}",
        "stage      " + "".join(f"{'R@' + n:>9}" for n in ns),
        "global     " + "".join(f"{report.global_recalls[n]:9.2f}" for n in ns),
        "re-ranked  " + "".join(f"{report.reranked_recalls[n]:9.2f}" for n in ns),
    ]
    return "\n".join(rows + answers_table(report))


def answers_table(report: EvalReport) -> list[str]:
    """Top-1 answers ranked by each score: AUC-PR and recall at 100% precision; the probability's ECE
    and reliability; the place-removed run's rejections."""
    if not report.answers:
        return []
    rows = ["", "top-1 answers ranked by   AUC-PR (95% interval)   R@100%P", *_score_rows(report)]
    if report.calibration is None:
        return [*rows, "uncalibrated index: no probability to evaluate"]
    rows.append(f"calibration {report.calibration['id']}: {report.calibration['source']}")
    for stage in ("global", "reranked"):
        quality = report.answers[stage]
        for other, versus in quality["probability_versus"].items():
            low, high = versus["interval"]
            rows.append(
                f"{stage} AUC-PR by probability minus by {other}: {versus['difference']:+.3f} "
                f"[{low:+.3f}, {high:+.3f}], better in {100 * versus['share_better']:.0f}% of resamples"
            )
    for stage in ("global", "reranked"):
        quality = report.answers[stage]
        low, high = quality["ece_interval"]
        noise = quality["ece_if_calibrated"]
        rows.append(
            f"{stage} probability: ECE {quality['ece']:.3f} [{low:.3f}, {high:.3f}] over 10 bins; a "
            f"perfectly calibrated one would show {noise['mean']:.3f} (95% below {noise['upper']:.3f}); "
            "reliability:"
        )
        rows += [
            f"  [{b['bin'][0]:.1f}, {b['bin'][1]:.1f}) n={b['n']:<4} mean p {b['mean_probability']:.3f}"
            f"  right {b['accuracy']:.3f}"
            for b in quality["reliability"]
        ]
    if report.place_removed:
        for stage in ("global", "reranked"):
            removed = report.place_removed[stage]
            share = "n/a" if removed["rejected"] is None else f"{100 * removed['rejected']:.1f}%"
            rows.append(
                f"true places removed, {stage}: {share} of {removed['queries']} rejected below p = "
                f"{removed['threshold']} (95% precision on the normal run)"
            )
    return rows


def _score_rows(report: EvalReport) -> list[str]:
    rows = []
    for stage in ("global", "reranked"):
        for key, quality in report.answers[stage].items():
            if key.startswith("by_"):
                auc, at_100 = quality["auc_pr"], quality["recall_at_100_precision"]
                low, high = quality["auc_pr_interval"]
                interval = f"[{low:.3f}, {high:.3f}]"
                rows.append(f"  {stage:9} {key[3:]:14} {auc:7.3f} {interval:16} {at_100:9.3f}")
    return rows


def sweep_table(reports: list[EvalReport]) -> str:
    """One row per feature block: global and re-ranked Recall@N side by side."""
    ns = list(reports[0].global_recalls)
    header = "block  " + "".join(f"{'global R@' + n:>13}" for n in ns)
    header += "".join(f"{'re-ranked R@' + n:>16}" for n in ns)
    rows = [header]
    for r in reports:
        row = f"{r.feature_block!s:<7}" + "".join(f"{r.global_recalls[n]:13.2f}" for n in ns)
        rows.append(row + "".join(f"{r.reranked_recalls[n]:16.2f}" for n in ns))
    return "\n".join(rows)
