"""Evaluation: the recall arithmetic by hand, and the whole protocol on a tiny dataset in the benchmark
layout made from the shared images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.shared_dataset import make_dataset
from index_builder.evaluate import EvalConfig, evaluate, plot_recalls, recall_at
from model.datasets import DatasetError, VPRSplit, within
from model.options import ModelOptions


def test_recall_arithmetic_by_hand():
    predictions = [[3, 1, 2], [0, 5, 4], [7, 8, 9], [2, 2, 2]]
    positives = [np.array([1]), np.array([4, 5]), np.array([], dtype=np.int64), np.array([6])]
    # query 0: hit at rank 2; query 1: hit at rank 2; query 2: no positives (a miss); query 3: never
    assert recall_at(predictions, positives, [1, 2, 3]) == {"1": 0.0, "2": 50.0, "3": 50.0}
    assert recall_at([[1], [4]], [np.array([1]), np.array([4])], [1]) == {"1": 100.0}


def test_positives_by_distance():
    refs = np.array([[0.0, 0.0], [10.0, 0.0], [30.0, 0.0], [1e6, 5e6]])
    points = np.array([[0.0, 0.0], [20.0, 0.0], [1e6 + 3, 5e6 + 4]])
    assert [p.tolist() for p in within(points, refs, 25.0)] == [[0, 1], [0, 1, 2], [3]]
    assert [p.tolist() for p in within(points, refs, 9.5)] == [[0], [], [3]]


def test_split_layout_and_queries_list(tmp_path, shared_data):
    root = make_dataset(tmp_path / "ds", shared_data)
    split = VPRSplit.load(root, "test")
    assert (len(split.database_paths), len(split.queries_paths)) == (20, 10)
    assert split.queries_utm[3].tolist() == [3003.0, 0.0]
    assert [len(p) for p in split.positives(25.0)] == [2] * 10
    listing = tmp_path / "list.txt"
    listing.write_text(split.queries_paths[0].name + "\n" + split.queries_paths[5].name + "\n")
    assert len(VPRSplit.load(root, "test", listing).queries_paths) == 2
    listing.write_text("nope.jpg\n")
    with pytest.raises(DatasetError, match="not in"):
        VPRSplit.load(root, "test", listing)
    with pytest.raises(DatasetError, match="does not exist"):
        VPRSplit.load(root, "val")


def test_evaluate_default_weights_end_to_end(tmp_path, shared_data):
    root = make_dataset(tmp_path / "ds", shared_data)
    config = EvalConfig(
        dataset=root,
        rerank_k=10,
        recalls=[1, 5, 10],
        index_dir=tmp_path / "idx",
        model=ModelOptions(device="cpu"),
    )
    report = evaluate(config, show_progress=False)
    assert (report.queries, report.database, report.queries_without_positives) == (10, 20, 0)
    assert set(report.global_recalls) == set(report.reranked_recalls) == {"1", "5", "10"}
    for recalls in (report.global_recalls, report.reranked_recalls):
        assert 0 <= recalls["1"] <= recalls["5"] <= recalls["10"] <= 100
        assert recalls["10"] >= 50  # chance would be about 10 percent at R@1
    again = evaluate(config, show_progress=False)  # the database index is reused, results identical
    assert again.global_recalls == report.global_recalls and again.reranked_recalls == report.reranked_recalls
    body = report.to_dict()
    assert body["global"] == report.global_recalls and body["checkpoint"]["fingerprint"]
    json.dumps(body)
    plot_recalls(report, tmp_path / "plot" / "recall.png")
    assert (tmp_path / "plot" / "recall.png").stat().st_size > 1000


def test_cli_eval_writes_json_and_table(tmp_path, shared_data, capsys):
    from app.cli import main

    root = make_dataset(tmp_path / "ds", shared_data)
    out = tmp_path / "results.json"
    code = main(
        [
            "eval",
            "--dataset",
            str(root),
            "--rerank-k",
            "5",
            "--recalls",
            "1,5",
            "--out",
            str(out),
            "--index-dir",
            str(tmp_path / "idx"),
            "--device",
            "cpu",
            "--plot",
            str(tmp_path / "r.png"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "re-ranked" in printed and "R@5" in printed
    results = json.loads(out.read_text())
    assert set(results["reranked"]) == {"1", "5"} and results["queries"] == 10
