"""`selavpr bench ...`: the benchmark scripts under bench/, reachable from the console script."""

from __future__ import annotations

import argparse

from bench import index, load, rerank


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark and print measured numbers as JSON")
    which = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    rerank_parser = which.add_parser("rerank", help="MNN re-ranking engine vs the full-tensor matcher")
    rerank.build_parser(rerank_parser).set_defaults(run=run_rerank)
    index_parser = which.add_parser(
        "index", help="index build throughput, storage, serving memory, ANN recall"
    )
    index.build_parser(index_parser).set_defaults(run=run_index)
    load_parser = which.add_parser("load", help="concurrent /localize clients against a running server")
    load.build_parser(load_parser).set_defaults(run=load.execute)


def run_rerank(args: argparse.Namespace) -> int:
    rerank.run(args)
    return 0


def run_index(args: argparse.Namespace) -> int:
    index.run(args)
    return 0
