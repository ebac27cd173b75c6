"""Calibration on the shared real images with the default weights: the self-calibrated index tells a
place missing from the database from one it holds, evaluation reports it, and `selavpr calibrate`
installs a calibration fitted on labelled queries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from app.commands.evaluate import answers_table
from bench.shared_dataset import make_dataset
from index_builder.builder import BuildConfig, build_index
from index_builder.calibration import SUPPLIED_FILE
from index_builder.evaluate import EvalConfig, evaluate
from index_builder.results import apply_min_probability
from index_builder.search import Localizer
from index_builder.status import index_status
from model.extractor import FeatureExtractor

MISSING = "p3"  # the place left out of the second database


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor.from_checkpoint("default", device="cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shared_data, extractor) -> tuple[Path, Path, Path]:
    """(dataset root: views i0 and i1 in the database, i2 the queries; an index of the whole database;
    an index of the database without place MISSING)."""
    root = make_dataset(tmp_path_factory.mktemp("calib") / "ds", shared_data)
    database = root / "images" / "test" / "database"
    build_index(BuildConfig(references=database, index_dir=root / "index-all"), extractor=extractor)
    partial = root / "without"
    partial.mkdir()
    for image in database.iterdir():
        if f"@{MISSING}_" not in image.name:
            shutil.copy(image, partial / image.name)
    build_index(BuildConfig(references=partial, index_dir=root / "index-without"), extractor=extractor)
    return root, root / "index-all", root / "index-without"


def _query(root: Path, place: str) -> Path:
    return next((root / "images" / "test" / "queries").glob(f"*@{place}_i2@*"))


def test_the_build_self_calibrates_and_status_says_how(dataset):
    _, index_all, _ = dataset
    status = index_status(index_all)["calibration"]
    assert status["calibrated"] and status["kind"] == "self" and status["id"].startswith("self-")
    assert status["samples"] >= 20 and 0 < status["positives"] < status["samples"]
    assert set(status["quality"]) >= {"reranked_cv_ece", "reranked_brier", "global_cv_ece"}
    assert "leave-one-out over 20 of 20 located references" in status["source"]


def test_a_place_missing_from_the_database_gets_a_low_probability(dataset, extractor):
    root, index_all, index_without = dataset
    with_place = Localizer(Localizer.open(index_all, device="cpu").index, extractor)
    without_place = Localizer(Localizer.open(index_without, device="cpu").index, extractor)
    query = _query(root, MISSING)
    held = with_place.localize(query, str(query))
    missing = without_place.localize(query, str(query))
    assert f"@{MISSING}_" in held.matches[0].path  # the place is found when it is there ...
    assert f"@{MISSING}_" not in missing.matches[0].path  # ... and some other place when it is not
    assert held.probability is not None and missing.probability is not None
    assert missing.probability < held.probability
    threshold = (held.probability + missing.probability) / 2
    unknown = apply_min_probability(missing.model_copy(deep=True), threshold)
    assert unknown.status == "unknown" and unknown.location is None and unknown.matches
    assert apply_min_probability(held, threshold).status == "located"


def test_eval_reports_precision_recall_calibration_and_place_removed(dataset, extractor, tmp_path):
    root, _, _ = dataset
    config = EvalConfig(
        dataset=root, rerank_k=10, recalls=[1, 5], index_dir=tmp_path / "idx", place_removed=True
    )
    report = evaluate(config, extractor, show_progress=False)
    assert report.calibration is not None
    reranked = report.answers["reranked"]
    assert {"by_probability", "by_confidence", "by_global_score"} <= set(reranked)
    assert 0.0 <= reranked["ece"] <= 1.0 and sum(b["n"] for b in reranked["reliability"]) == 10
    right = report.reranked_recalls["1"] / 100
    curve = reranked["by_probability"]["curve"]
    # every query has a true match: accepting all, recall and precision are both Recall@1
    assert curve[-1]["recall"] == pytest.approx(right) and curve[-1]["precision"] == pytest.approx(right)
    removed = report.place_removed["reranked"]
    assert removed["queries"] == 10 and removed["wrong_anyway"] == 10  # every answer is some other place
    assert removed["rejected"] is not None and removed["rejected"] >= 0.5
    # how uncertain the figures are, in the JSON and the printed table
    low, high = reranked["ece_interval"]
    assert 0.0 <= low <= high <= 1.0
    noise = reranked["ece_if_calibrated"]
    assert 0.0 <= noise["mean"] <= noise["upper"] <= 1.0
    for key in ("by_probability", "by_confidence", "by_global_score"):
        low, high = reranked[key]["auc_pr_interval"]
        assert 0.0 <= low <= high <= 1.0
    versus = reranked["probability_versus"]["confidence"]
    assert versus["interval"][0] <= versus["interval"][1] and 0.0 <= versus["share_better"] <= 1.0
    printed = "\n".join(answers_table(report))
    assert f"ECE {reranked['ece']:.3f} [" in printed and "a perfectly calibrated one would show" in printed
    assert "reranked AUC-PR by probability minus by confidence" in printed
    json.dumps(report.to_dict())


def test_cli_calibrate_installs_a_supplied_calibration(dataset, tmp_path, capsys):
    from app.cli import main

    root, index_all, _ = dataset
    index_dir = tmp_path / "index"
    shutil.copytree(index_all, index_dir)
    queries = root / "images" / "test" / "queries"
    args = ["calibrate", "--index-dir", str(index_dir), "--queries", str(queries), "--device", "cpu"]
    assert main([*args, "--rerank-k", "10"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibrated"] and out["queries"] == 10 and (index_dir / SUPPLIED_FILE).exists()
    status = index_status(index_dir)["calibration"]
    assert status["kind"] == "supplied" and status["id"] == out["calibration"]["id"]
    assert main(["localize", str(_query(root, "p0")), "--index-dir", str(index_dir), "--device", "cpu"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["calibration"] == status["id"] and 0.0 <= answer["probability"] <= 1.0
    assert main(["localize", str(_query(root, "p0")), "--index-dir", str(index_dir), "--device", "cpu",
                 "--min-probability", "1.0"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["status"] in ("unknown", "located")
    assert main(["calibrate", "--index-dir", str(index_dir), "--remove"]) == 0
    assert index_status(index_dir)["calibration"]["kind"] == "self"
    assert np.isfinite(out["calibration"]["quality"]["reranked_brier"])
