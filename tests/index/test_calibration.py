"""The answer's probability: the fit recovers a known truth, the metrics by hand, the features by hand,
and 'unknown' below min_probability."""

from __future__ import annotations

import numpy as np
import pytest

from index_builder.calibration import (
    Calibration,
    CandidateView,
    LogisticModel,
    average_precision,
    bootstrap_interval,
    ece_if_calibrated,
    expected_calibration_error,
    features,
    fit_answers,
    fit_logistic,
    labelled_answers,
    precision_recall,
    refit_bias,
    reliability,
    threshold_for_precision,
)
from index_builder.results import EstimatedLocation, LocalizeResult, apply_min_probability


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_fit_recovers_a_known_logistic_truth():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6000, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0]
    true_p = _sigmoid(0.4 + 1.5 * x[:, 0] - 0.8 * x[:, 1] + 0.0 * x[:, 2])
    y = (rng.random(len(x)) < true_p).astype(float)
    model = fit_logistic(x, y, ("a", "b", "c"), l2=1.0)
    raw_weights = np.array(model.weights) / np.array(model.scale)  # back to the features' own scale
    assert raw_weights == pytest.approx([1.5, -0.8, 0.0], abs=0.12)
    assert np.abs(model.predict(x) - true_p).mean() < 0.02
    assert expected_calibration_error(model.predict(x), y) < 0.03
    # a constant feature does not break the fit
    flat = fit_logistic(np.c_[x[:, :1], np.ones(len(x))], y, ("a", "one"))
    assert np.isfinite(flat.weights).all() and abs(flat.weights[1]) < 1e-6


def test_separable_samples_stay_finite():
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    model = fit_logistic(x, np.array([0.0, 0.0, 1.0, 1.0]), ("a",))
    p = model.predict(x)
    assert np.isfinite(model.weights).all() and p[0] < 0.5 < p[3]


def test_refit_bias_takes_the_prior_from_the_given_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 1))
    y = (rng.random(len(x)) < _sigmoid(2 * x[:, 0])).astype(float)
    model = fit_logistic(x, y, ("a",))
    shifted = (rng.random(len(x)) < _sigmoid(2 * x[:, 0] + 1.5)).astype(float)
    refitted = refit_bias(model, x, shifted)
    assert refitted.weights == model.weights
    assert refitted.bias - model.bias == pytest.approx(1.5, abs=0.2)
    assert refitted.predict(x).mean() == pytest.approx(shifted.mean(), abs=0.01)


def test_precision_recall_and_calibration_error_by_hand():
    pr = precision_recall(np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, False, True, False]))
    assert [(c["precision"], c["recall"]) for c in pr["curve"]] == [
        (1.0, 0.5),
        (0.5, 0.5),
        (pytest.approx(2 / 3, abs=1e-6), 1.0),
        (0.5, 1.0),
    ]
    assert pr["auc_pr"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-6)
    assert pr["recall_at_100_precision"] == 0.5
    # recall over the queries that have a true match (4 here), and ties accepted together
    tied = precision_recall(np.array([0.5, 0.5, 0.1]), np.array([True, False, True]), relevant=4)
    assert [(c["precision"], c["recall"]) for c in tied["curve"]] == [
        (0.5, 0.25),
        (pytest.approx(2 / 3, abs=1e-6), 0.5),
    ]
    assert tied["recall_at_100_precision"] == 0.0
    p, y = np.array([0.95, 0.95, 0.15, 0.15]), np.array([1.0, 0.0, 0.0, 0.0])
    assert expected_calibration_error(p, y) == pytest.approx(0.5 * 0.45 + 0.5 * 0.15)
    assert [(r["n"], r["accuracy"]) for r in reliability(p, y)] == [(2, 0.0), (2, 0.5)]
    assert threshold_for_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 1, 0, 1]), 0.95) == 0.8
    assert threshold_for_precision(np.array([0.9, 0.8]), np.array([0, 1]), 0.95) is None


def test_calibration_error_is_the_reliability_tables_sum_and_ap_the_curves_area():
    rng = np.random.default_rng(1)
    p, y = rng.random(200), rng.random(200) < 0.6
    rows = reliability(p, y)
    by_table = sum(r["count"] * abs(r["mean_probability"] - r["accuracy"]) for r in rows)
    assert expected_calibration_error(p, y) == pytest.approx(by_table, abs=1e-12)
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([1.0, 0.0])) == 0.0  # p = 1: top bin
    for relevant in (None, 150):
        assert average_precision(p, y, relevant) == pytest.approx(
            precision_recall(p, y, relevant)["auc_pr"], abs=1e-6
        )
    assert average_precision(p, np.zeros(200, dtype=bool)) == 0.0


def test_bootstrap_interval_matches_the_normal_approximation_of_a_mean():
    rng = np.random.default_rng(2)
    y = (rng.random(400) < 0.3).astype(float)
    low, high = bootstrap_interval(lambda i: y[i].mean(), len(y))
    half = 1.96 * np.sqrt(y.mean() * (1 - y.mean()) / len(y))
    assert low < y.mean() < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_interval(lambda i: y[i].mean(), len(y)) == [low, high]  # a fixed seed: repeatable


def test_bootstrap_resamples_groups_together():
    # 25 photos, each in 8 identical variants: the information of 25 queries, not of 200
    rng = np.random.default_rng(4)
    photos = (rng.random(25) < 0.5).astype(float)
    y, groups = np.repeat(photos, 8), np.repeat(np.arange(25), 8)
    naive = np.diff(bootstrap_interval(lambda i: y[i].mean(), len(y)))[0]
    grouped = np.diff(bootstrap_interval(lambda i: y[i].mean(), len(y), groups))[0]
    per_photo = np.diff(bootstrap_interval(lambda i: photos[i].mean(), len(photos)))[0]
    assert grouped == pytest.approx(per_photo, rel=0.2)
    assert grouped > 2 * naive  # about sqrt(8) times wider


def test_ece_of_a_perfectly_calibrated_predictor():
    # all p = 0.5: ECE = |share right - 0.5|, whose mean is about 0.5 * sqrt(2 / (pi n))
    n = 100
    noise = ece_if_calibrated(np.full(n, 0.5))
    assert noise["mean"] == pytest.approx(0.5 * np.sqrt(2 / (np.pi * n)), rel=0.1)
    assert noise["mean"] < noise["upper"] < 0.15
    assert ece_if_calibrated(np.r_[np.zeros(10), np.ones(10)]) == {"mean": 0.0, "upper": 0.0}
    # more answers, less noise; and a predictor off by 0.2 is far above the noise of its sample size
    rng = np.random.default_rng(5)
    p = rng.uniform(0.3, 0.7, size=1000)
    assert ece_if_calibrated(p)["upper"] < ece_if_calibrated(p[:50])["mean"]
    off = expected_calibration_error(p, rng.random(len(p)) < p - 0.2)
    assert off > 3 * ece_if_calibrated(p)["upper"]


def _view(counts, scores, east, positions=100):
    n = len(counts)
    return CandidateView(
        scores=np.array(scores, dtype=float),
        east=np.array(east, dtype=float),
        north=np.zeros(n),
        zone=np.array([0 if np.isnan(e) else 1 for e in east]),
        counts=np.array(counts),
        positions=positions,
    )


def test_features_by_hand():
    # global order 0..4; re-ranked: candidate 2 (40 matches) first; candidate 3 is 10 m from it, 0 and 1
    # far away, 4 has no location
    view = _view([10, 5, 40, 30, 50], [0.9, 0.8, 0.7, 0.6, 0.5], [1000, 2000, 0, 10, np.nan])
    share, log_ratio, gap = features(view, "reranked", radius_m=25)
    assert share == pytest.approx(0.4)  # the unlocated candidate 4 has more matches but gives no location
    assert log_ratio == pytest.approx(np.log(41 / 11))  # best far count: candidate 0's 10
    assert gap == pytest.approx(0.7 - 0.9)
    score, global_gap = features(view, "global", radius_m=25)
    assert (score, global_gap) == (pytest.approx(0.9), pytest.approx(0.9 - 0.8))  # the best far one: 1
    assert features(_view([3], [0.5], [np.nan]), "reranked") is None  # nothing located: no probability


def test_labelled_answers_add_the_place_removed_answer():
    view = _view([10, 5, 40, 30], [0.9, 0.8, 0.7, 0.6], [1000, 2000, 0, 10])
    rows = list(labelled_answers(view, (3.0, 0.0, 1), radius_m=25))
    normal = [(stage, right) for stage, _, right, is_normal in rows if is_normal]
    removed = [(stage, right) for stage, _, right, is_normal in rows if not is_normal]
    assert normal == [("reranked", 1.0), ("global", 0.0)]  # re-ranking finds the place, global does not
    assert removed == [("reranked", 0.0), ("global", 0.0)]  # without it every answer is wrong


def test_fit_answers_needs_both_outcomes():
    x = np.array([0.2, 0.1, 0.0])
    right = [("reranked", x, 1.0, True), ("global", x[:2], 1.0, True)] * 10
    calibration, why = fit_answers(right, "self", 25.0, "", "", minimum=8)
    assert calibration is None and "all 10 answers were right" in why
    calibration, why = fit_answers(right[:4], "self", 25.0, "", "", minimum=8)
    assert calibration is None and "at least 8" in why


def _result(probability):
    location = EstimatedLocation(lat=1.0, lon=2.0, source_id=0, confidence=0.5)
    return LocalizeResult(matches=[], location=location, index_version="v1", probability=probability)


def test_min_probability_turns_answers_unknown():
    low = apply_min_probability(_result(0.2), 0.5)
    assert (low.status, low.location) == ("unknown", None)
    high = apply_min_probability(_result(0.8), 0.5)
    assert high.status == "located" and high.location is not None
    assert apply_min_probability(_result(0.2), None).location is not None  # off by default
    uncalibrated = apply_min_probability(_result(None), 0.5)  # cannot be judged: left as it is
    assert uncalibrated.status == "located" and uncalibrated.location is not None


def test_calibration_round_trips_with_a_stable_identity():
    model = LogisticModel(("share", "log_ratio", "global_gap"), [0, 0, 0], [1, 1, 1], [1.0, 2.0, 0.5], -1.0)
    glob = LogisticModel(("global_score", "global_gap"), [0, 0], [1, 1], [1.0, 1.0], 0.0)
    calibration = Calibration("self", 25.0, {"reranked": model, "global": glob}, 40, 20)
    again = Calibration.from_dict(calibration.to_dict())
    assert again.id == calibration.id and again.id.startswith("self-")
    view = _view([10, 5, 40, 30], [0.9, 0.8, 0.7, 0.6], [1000, 2000, 0, 10])
    expected = _sigmoid(-1.0 + 0.4 + 2.0 * np.log(41 / 11) + 0.5 * (0.7 - 0.9))
    assert again.probability(view) == pytest.approx(expected)


def test_answer_quality_reports_intervals_and_the_paired_difference():
    from index_builder.evaluate import TopAnswers, answer_quality

    rng = np.random.default_rng(6)
    right = rng.random(60) < 0.7
    answers = TopAnswers()
    for stage in ("reranked", "global"):
        answers.right[stage] = right.tolist()
        # the probability separates right from wrong answers, the global score barely does
        answers.probability[stage] = np.where(right, 0.6, 0.4) + 0.3 * rng.random(60)
        answers.global_score[stage] = rng.random(60) + 0.1 * right
    answers.confidence = list(answers.global_score["reranked"])
    quality = answer_quality(answers, np.ones(60, dtype=bool), calibrated=True)["reranked"]
    low, high = quality["by_probability"]["auc_pr_interval"]
    assert low <= quality["by_probability"]["auc_pr"] <= high
    versus = quality["probability_versus"]["confidence"]
    assert versus["difference"] > 0 and versus["interval"][0] > 0 and versus["share_better"] > 0.95
    assert quality["ece_interval"][0] <= quality["ece"] <= quality["ece_interval"][1]
    assert set(quality["ece_if_calibrated"]) == {"mean", "upper"}
    uncalibrated = answer_quality(answers, np.ones(60, dtype=bool), calibrated=False)["reranked"]
    assert "ece" not in uncalibrated and set(uncalibrated) == {"by_global_score", "by_confidence"}


def test_perturbed_queries_are_repeatable_variants_grouped_by_photo(shared_data, tmp_path):
    from bench.perturbed_queries import make_perturbed_dataset, photo_group
    from model.datasets import VPRSplit

    first = make_perturbed_dataset(tmp_path / "a", shared_data, "i1", variants=2)
    again = make_perturbed_dataset(tmp_path / "b", shared_data, "i1", variants=2)
    split = VPRSplit.load(first, "test")
    assert (len(split.database_paths), len(split.queries_paths)) == (20, 20)
    assert all(len(p) == 2 for p in split.positives(25.0))  # each variant: its place's two other views
    names = [p.name for p in split.queries_paths]
    assert [
        (first / "images/test/queries" / n).read_bytes() == (again / "images/test/queries" / n).read_bytes()
        for n in names
    ] == [True] * 20
    p0 = sorted(p for p in split.queries_paths if "@p0_i1_v" in p.name)
    assert [photo_group(p) for p in p0] == ["p0_i1", "p0_i1"]
    assert len({photo_group(p) for p in split.queries_paths}) == 10
    from PIL import Image

    photo = next((shared_data / "matching_triplets/p0/i1").iterdir())
    source = np.asarray(Image.open(photo).convert("RGB"), float)
    variants = [np.asarray(Image.open(p), float) for p in p0]
    assert variants[0].shape == source.shape
    assert np.abs(variants[0] - source).mean() > 5 and np.abs(variants[0] - variants[1]).mean() > 5


def test_pool_adjacent_violators_by_hand():
    from bench.calibration_choice import _pool_adjacent_violators

    knots, values = _pool_adjacent_violators(np.array([0.1, 0.2, 0.3, 0.4]), np.array([1.0, 0.0, 1.0, 1.0]))
    # (1+1)/3 > (0+1)/3: the first two pool to (1+1)/(2+2) = 0.5; then 2/3 twice pools to (2+1)/(2+2)
    assert knots == pytest.approx([0.15, 0.35]) and values == pytest.approx([0.5, 0.75])
