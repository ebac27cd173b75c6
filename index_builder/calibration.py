"""A calibrated probability for an answer: P(the answer's location is within `radius_m` of the truth).

Features come from what a search already computed for one query (global scores, MNN counts and the
candidates' locations); a logistic regression on a handful of them turns them into a probability. It is
numpy only, fitted by Newton's method with a small L2 penalty, and explainable: each weight says how much
a feature (standardized) moves the log-odds. docs/evaluation.md describes the features and the fit.

Two models per calibration: `reranked` (the answer after MNN re-ranking, what /localize returns) and
`global` (the global top-1, for evaluation and comparison).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

DEFAULT_RADIUS_M = 25.0
STAGES = ("reranked", "global")
Stage = Literal["reranked", "global"]
FEATURES: dict[str, tuple[str, ...]] = {
    # share: the top-1's MNN matches / the query's positions (today's `confidence`);
    # log_ratio: log((top-1 count + 1) / (best count of a candidate farther than the radius + 1)), a
    #   distinctiveness test like Lowe's ratio, scale-free across local modes;
    # global_gap: top-1's global score minus the best global score farther than the radius.
    # (How many of the top answers agree on the location is left out: self-calibration holds out one
    # view of a place, so agreement is lower there than for real queries, and the fit learned it wrong.)
    "reranked": ("share", "log_ratio", "global_gap"),
    "global": ("global_score", "global_gap"),
}


@dataclass
class CandidateView:
    """One query's candidates as the search saw them, in global order (index i: the i-th best global
    score). `counts` None: not re-ranked. Locations: UTM metres, NaN where a reference has none."""

    scores: np.ndarray  # (K,) float
    east: np.ndarray  # (K,) float, NaN: no location
    north: np.ndarray
    zone: np.ndarray  # (K,) int, 0: no location
    counts: np.ndarray | None = None  # (K,) int
    positions: int = 1  # the query's local positions

    def order(self, stage: Stage) -> np.ndarray:
        """Candidate indices in answer order: by count (stable: equal counts keep the global order)."""
        if stage == "global" or self.counts is None:
            return np.arange(len(self.scores))
        return np.argsort(-np.asarray(self.counts), kind="stable")

    def without(self, keep: np.ndarray) -> CandidateView:
        """Only the candidates where `keep` is true (e.g. a place removed from the database)."""
        return CandidateView(
            self.scores[keep],
            self.east[keep],
            self.north[keep],
            self.zone[keep],
            None if self.counts is None else self.counts[keep],
            self.positions,
        )


@dataclass
class Locations:
    """Per-reference UTM metres, NaN / zone 0 where a reference has no location."""

    east: np.ndarray
    north: np.ndarray
    zone: np.ndarray
    zone_of: dict[str, int] = field(default_factory=dict)  # UTM zone label ('' none) -> the id in `zone`

    @classmethod
    def of(cls, records: Sequence[Any]) -> Locations:
        east = np.array([np.nan if r.utm_east is None else r.utm_east for r in records], dtype=np.float64)
        north = np.array([np.nan if r.utm_north is None else r.utm_north for r in records], dtype=np.float64)
        labels = [(r.utm_zone or "") if r.utm_east is not None else None for r in records]
        return cls(east, north, *zone_ids(labels))

    def view(self, ids: np.ndarray, scores: np.ndarray, counts=None, positions: int = 1) -> CandidateView:
        return CandidateView(scores, self.east[ids], self.north[ids], self.zone[ids], counts, positions)


def zone_ids(labels: Sequence[str | None]) -> tuple[np.ndarray, dict[str, int]]:
    """UTM zone labels -> small ints, 0 for 'no location', and the label -> id table; located references
    without a zone label ('') share one id (bare UTM metres, one local frame)."""
    known: dict[str, int] = {}
    out = np.zeros(len(labels), dtype=np.int32)
    for i, label in enumerate(labels):
        if label is not None:
            out[i] = known.setdefault(label, len(known) + 1)
    return out, known


def near_mask(view: CandidateView, index: int, radius_m: float) -> np.ndarray:
    """Candidates within `radius_m` of candidate `index` (same UTM zone; unlocated ones never are)."""
    d = np.hypot(view.east - view.east[index], view.north - view.north[index])
    return (view.zone == view.zone[index]) & (view.zone > 0) & (d <= radius_m)


def answer_index(view: CandidateView, stage: Stage) -> int | None:
    """The candidate the answer's location comes from: the best-ranked one with a location."""
    for i in view.order(stage):
        if view.zone[i] > 0:
            return int(i)
    return None


def features(view: CandidateView, stage: Stage, radius_m: float = DEFAULT_RADIUS_M) -> np.ndarray | None:
    """The stage's feature vector (FEATURES[stage]) for this query, None when no candidate is located."""
    top = answer_index(view, stage)
    if top is None:
        return None
    far = (view.zone > 0) & ~near_mask(view, top, radius_m)
    best_far_score = float(view.scores[far].max()) if far.any() else 0.0
    global_gap = float(view.scores[top]) - best_far_score
    if stage == "global":
        return np.array([float(view.scores[top]), global_gap])
    assert view.counts is not None
    count = float(view.counts[top])
    best_far_count = float(view.counts[far].max()) if far.any() else 0.0
    share = min(1.0, count / max(view.positions, 1))
    log_ratio = math.log((count + 1.0) / (best_far_count + 1.0))
    return np.array([share, log_ratio, global_gap])


def is_right(view: CandidateView, stage: Stage, truth: tuple[float, float, int], radius_m: float) -> bool:
    """Whether the stage's answer lies within `radius_m` of truth (east, north, zone id)."""
    top = answer_index(view, stage)
    if top is None or view.zone[top] != truth[2]:
        return False
    return bool(np.hypot(view.east[top] - truth[0], view.north[top] - truth[1]) <= radius_m)


def labelled_answers(
    view: CandidateView, truth: tuple[float, float, int], radius_m: float, place_removed: bool = True
) -> Iterator[tuple[Stage, np.ndarray, float, bool]]:
    """(stage, features, right?, normal?) of one query whose true location is known: its answer as it
    is, then (place_removed) with every candidate within the radius of the truth left out, the answer a
    photo of a place missing from the database would get (the same counts: it costs nothing more)."""
    views = [view]
    if place_removed:
        d = np.hypot(view.east - truth[0], view.north - truth[1])
        here = (view.zone == truth[2]) & (d <= radius_m)
        if (~here).any():
            views.append(view.without(~here))
    for n, v in enumerate(views):
        for stage in STAGES:
            x = features(v, stage, radius_m)
            if x is not None:
                yield stage, x, float(is_right(v, stage, truth, radius_m)), n == 0


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


@dataclass
class LogisticModel:
    """p = sigmoid(bias + sum_i weight_i * (x_i - mean_i) / scale_i)."""

    features: tuple[str, ...]
    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(n, F) or (F,) features -> probabilities."""
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        return _sigmoid(z @ np.asarray(self.weights) + self.bias)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "features": list(self.features)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LogisticModel:
        return cls(**{**data, "features": tuple(data["features"])})


def fit_logistic(
    x: np.ndarray, y: np.ndarray, names: Sequence[str], l2: float = 1.0, steps: int = 50
) -> LogisticModel:
    """Penalized maximum likelihood (L2 on the weights of standardized features, none on the bias) by
    Newton's method; the penalty keeps small or separable samples finite."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)  # a constant feature gets weight ~0, not a division by 0
    z = np.hstack([np.ones((len(x), 1)), (x - mean) / scale])
    penalty = np.diag([0.0] + [l2] * x.shape[1])
    theta = np.zeros(z.shape[1])
    prior = np.clip(y.mean(), 1e-3, 1 - 1e-3)
    theta[0] = math.log(prior / (1 - prior))
    for _ in range(steps):
        p = _sigmoid(z @ theta)
        gradient = z.T @ (p - y) + penalty @ theta
        hessian = (z * (p * (1 - p))[:, None]).T @ z + penalty + 1e-9 * np.eye(len(theta))
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    return LogisticModel(tuple(names), mean.tolist(), scale.tolist(), theta[1:].tolist(), float(theta[0]))


def refit_bias(model: LogisticModel, x: np.ndarray, y: np.ndarray, steps: int = 50) -> LogisticModel:
    """The same weights, the bias fitted again on (x, y) alone: the prior of right answers taken from a
    sample representative of real queries, the slope from all samples. The bias makes the mean
    probability on (x, y) equal to the share of right answers, counted with Laplace's rule ((right + 1)
    / (n + 2)), so that a sample of only right answers still gives a finite bias."""
    z = ((np.asarray(x, dtype=np.float64) - model.mean) / model.scale) @ np.asarray(model.weights)
    target = (float(np.sum(y)) + 1.0) / (len(z) + 2.0)
    bias = model.bias
    for _ in range(steps):
        p = _sigmoid(z + bias)
        step = (np.sum(p) - target * len(z)) / (np.sum(p * (1 - p)) + 1e-9)
        bias -= step
        if abs(step) < 1e-9:
            break
    return LogisticModel(model.features, model.mean, model.scale, model.weights, float(bias))


# --- metrics ---------------------------------------------------------------------------------------


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Sum over equal-width bins of (share of answers in the bin) x |mean probability - accuracy|, i.e.
    sum over bins of |sum of probabilities - number right| / n."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if not len(p):
        return 0.0
    which = np.minimum((p * bins).astype(int), bins - 1)
    gap = np.bincount(which, weights=p, minlength=bins) - np.bincount(which, weights=y, minlength=bins)
    return float(np.abs(gap).sum() / len(p))


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 10) -> list[dict[str, Any]]:
    """The reliability diagram as rows: each bin's range, share of answers, mean probability, accuracy.
    `count` is the share of all answers (so ECE is a plain sum); `n` the number."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        sel = which == b
        if not sel.any():
            continue
        rows.append(
            {
                "bin": [b / bins, (b + 1) / bins],
                "n": int(sel.sum()),
                "count": float(sel.mean()),
                "mean_probability": float(p[sel].mean()),
                "accuracy": float(y[sel].mean()),
            }
        )
    return rows


def precision_recall(score: np.ndarray, correct: np.ndarray, relevant: int | None = None) -> dict[str, Any]:
    """Top-1 answers accepted from the highest score down (ties together): the precision-recall curve,
    its area (average precision), and the highest recall at 100% precision. Recall's denominator is
    `relevant` (queries that have a true match in the database; default: the correct answers)."""
    relevant = int(np.sum(correct)) if relevant is None else relevant
    thresholds, precision, recall = _pr_points(score, correct, relevant)
    auc = _area(precision, recall) if relevant else 0.0
    perfect = recall[precision >= 1.0]
    return {
        "auc_pr": round(auc, 6),
        "recall_at_100_precision": round(float(perfect.max()) if len(perfect) else 0.0, 6),
        "curve": [
            {"threshold": round(float(t), 6), "precision": round(float(p), 6), "recall": round(float(r), 6)}
            for t, p, r in zip(thresholds, precision, recall, strict=True)
        ],
    }


def _pr_points(
    score: np.ndarray, correct: np.ndarray, relevant: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, precision, recall) at each distinct score, highest first (ties accepted together)."""
    score, correct = np.asarray(score, dtype=np.float64), np.asarray(correct, dtype=bool)
    order = np.argsort(-score, kind="stable")
    s, c = score[order], correct[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True] if len(s) else np.array([], dtype=bool)
    tp, accepted = np.cumsum(c)[last_of_tie], np.nonzero(last_of_tie)[0] + 1
    precision = tp / np.maximum(accepted, 1)
    recall = tp / relevant if relevant else np.zeros_like(precision, dtype=np.float64)
    return s[last_of_tie], precision, recall


def _area(precision: np.ndarray, recall: np.ndarray) -> float:
    """Average precision: the precision at each step, weighted by the recall the step adds."""
    return float(np.sum((recall - np.r_[0.0, recall[:-1]]) * precision))


def average_precision(score: np.ndarray, correct: np.ndarray, relevant: int | None = None) -> float:
    """precision_recall()'s AUC-PR alone, without the curve (for resampling)."""
    relevant = int(np.sum(correct)) if relevant is None else relevant
    if not relevant:
        return 0.0
    _, precision, recall = _pr_points(score, correct, relevant)
    return _area(precision, recall)


# --- how far the figures are from noise --------------------------------------------------------------

BOOTSTRAP_DRAWS = 1000
BOOTSTRAP_SEED = 0


def bootstrap_samples(
    n: int, groups: Sequence[Any] | None = None, draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED
) -> Iterator[np.ndarray]:
    """`draws` resamples (indices, with replacement) of n queries. With `groups` (one label per query),
    whole groups are resampled: variants of one photo are not independent queries, so resampling them
    one by one would make an interval too narrow."""
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(draws):
            yield rng.integers(0, n, size=n)
        return
    _, label = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.nonzero(label == g)[0] for g in range(label.max() + 1)]
    for _ in range(draws):
        yield np.concatenate([members[g] for g in rng.integers(0, len(members), size=len(members))])


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    n: int,
    groups: Sequence[Any] | None = None,
    level: float = 0.95,
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = BOOTSTRAP_SEED,
) -> list[float]:
    """The percentile bootstrap interval [low, high] of statistic(indices of the queries) at `level`."""
    values = np.array([statistic(i) for i in bootstrap_samples(n, groups, draws, seed)])
    tail = (1 - level) / 2
    return [round(float(np.quantile(values, q)), 4) + 0.0 for q in (tail, 1 - tail)]  # + 0.0: no -0.0


def ece_if_calibrated(
    p: np.ndarray, bins: int = 10, draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED
) -> dict[str, float]:
    """The ECE a perfectly calibrated predictor would show with these probabilities at this sample size:
    labels drawn as Bernoulli(p) for the observed p, `draws` times. `mean` is what to expect from noise
    alone, `upper` its 95th percentile: an observed ECE below `upper` cannot tell miscalibration from
    chance."""
    p = np.asarray(p, dtype=np.float64)
    rng = np.random.default_rng(seed)
    values = np.array([expected_calibration_error(p, rng.random(len(p)) < p, bins) for _ in range(draws)])
    return {"mean": round(float(values.mean()), 4), "upper": round(float(np.quantile(values, 0.95)), 4)}


def threshold_for_precision(score: np.ndarray, correct: np.ndarray, target: float = 0.95) -> float | None:
    """The lowest threshold t whose accepted answers (score >= t) have at least `target` precision; None
    when no threshold reaches it."""
    curve = precision_recall(score, correct)["curve"]
    good = [row["threshold"] for row in curve if row["precision"] >= target]
    return min(good) if good else None


# --- the calibration stored with an index version --------------------------------------------------


@dataclass
class Calibration:
    """Fitted models and how they were fitted. `kind`: 'self' (the index on its own references, at build
    time) or 'supplied' (`selavpr calibrate` on a labelled query set)."""

    kind: str
    radius_m: float
    models: dict[str, LogisticModel]
    samples: int
    positives: int
    quality: dict[str, float] = field(default_factory=dict)
    source: str = ""
    seconds: float = 0.0
    encoding_fingerprint: str = ""  # the encoding it was fitted on (a supplied one applies only to it)
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            body = json.dumps({k: m.to_dict() for k, m in sorted(self.models.items())}, sort_keys=True)
            self.id = f"{self.kind}-{hashlib.sha256(body.encode()).hexdigest()[:12]}"

    def probability(self, view: CandidateView, stage: Stage = "reranked") -> float | None:
        x = features(view, stage, self.radius_m)
        return None if x is None else float(self.models[stage].predict(x))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "models": {k: m.to_dict() for k, m in self.models.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        models = {k: LogisticModel.from_dict(m) for k, m in data["models"].items()}
        return cls(**{**data, "models": models})

    def summary(self) -> dict[str, Any]:
        """What `index status` shows: identity, sample size and fit quality, not the weights."""
        keys = ("id", "kind", "radius_m", "samples", "positives", "quality", "source", "seconds")
        return {k: getattr(self, k) for k in keys}


def fit_calibration(
    samples: dict[str, tuple[np.ndarray, np.ndarray]],
    kind: str,
    radius_m: float,
    source: str = "",
    encoding_fingerprint: str = "",
    prior_rows: dict[str, np.ndarray] | None = None,
) -> Calibration:
    """samples: stage -> (features (n, F), labels (n,)). `prior_rows` (stage -> boolean mask): the rows
    whose share of right answers the bias is refitted to (refit_bias), e.g. the leave-one-out answers
    without the place-removed ones; default all. Quality, on those rows: in-sample log loss and Brier
    score, and the ECE of 5-fold cross-validated predictions (a figure for data the fit did not see)."""
    models, quality = {}, {}
    for stage, (x, y) in samples.items():
        normal = prior_rows[stage] if prior_rows is not None else np.ones(len(y), dtype=bool)
        models[stage] = _fit_stage(x, y, normal, stage)
        p = np.clip(models[stage].predict(x[normal]), 1e-6, 1 - 1e-6)
        yn = y[normal]
        quality[f"{stage}_log_loss"] = round(float(-np.mean(yn * np.log(p) + (1 - yn) * np.log(1 - p))), 4)
        quality[f"{stage}_brier"] = round(float(np.mean((p - yn) ** 2)), 4)
        cv = _cross_validated(x, y, normal, stage)
        quality[f"{stage}_cv_ece"] = round(expected_calibration_error(cv[normal], yn), 4)
    x, y = samples["reranked"]
    return Calibration(
        kind, radius_m, models, len(y), int(np.sum(y)), quality, source, 0.0, encoding_fingerprint
    )


def _fit_stage(x: np.ndarray, y: np.ndarray, normal: np.ndarray, stage: str) -> LogisticModel:
    model = fit_logistic(x, y, FEATURES[stage])
    return refit_bias(model, x[normal], y[normal]) if normal.any() else model


def fit_answers(
    answers: Sequence[tuple[Stage, np.ndarray, float, bool]],
    kind: str,
    radius_m: float,
    source: str,
    encoding_fingerprint: str,
    minimum: int,
) -> tuple[Calibration | None, str]:
    """labelled_answers() rows -> (calibration, note) or (None, why not). Place-removed answers teach
    what wrong looks like; the normal ones alone set how often answers are right (their prior is that
    of queries of places in the database), see refit_bias."""
    by_stage = {s: [a for a in answers if a[0] == s] for s in STAGES}
    labels = np.array([a[2] for a in by_stage["reranked"]])
    reason = unusable_reason(labels, minimum)
    if reason:
        return None, reason
    samples = {s: (np.stack([a[1] for a in r]), np.array([a[2] for a in r])) for s, r in by_stage.items()}
    normal = {s: np.array([a[3] for a in rows]) for s, rows in by_stage.items()}
    calibration = fit_calibration(samples, kind, radius_m, source, encoding_fingerprint, normal)
    return calibration, f"{kind}-calibrated on {calibration.samples} answers"


def _cross_validated(
    x: np.ndarray, y: np.ndarray, normal: np.ndarray, stage: str, folds: int = 5
) -> np.ndarray:
    out = np.empty(len(y))
    fold = np.arange(len(y)) % folds
    for k in range(folds):
        test, train = fold == k, fold != k
        if not test.any():
            continue
        if train.sum() < 2 or len(set(y[train].tolist())) < 2:
            out[test] = y[train].mean() if train.any() else 0.5
            continue
        out[test] = _fit_stage(x[train], y[train], normal[train], stage).predict(x[test])
    return out


def unusable_reason(labels: np.ndarray, minimum: int) -> str | None:
    """Why these labels cannot be fitted (too few, or all one class); None when they can."""
    if len(labels) < minimum:
        return f"{len(labels)} labelled answers; at least {minimum} are needed"
    if labels.all() or not labels.any():
        return f"all {len(labels)} answers were {'right' if labels.all() else 'wrong'}: nothing to separate"
    return None


# --- a calibration supplied by `selavpr calibrate` ----------------------------------------------------

SUPPLIED_FILE = "calibration.json"  # in the index directory; applies to versions of its encoding


def read_supplied(index_dir: Path) -> Calibration | None:
    try:
        return Calibration.from_dict(json.loads((index_dir / SUPPLIED_FILE).read_text()))
    except FileNotFoundError:
        return None


def write_supplied(index_dir: Path, calibration: Calibration) -> Path:
    """Written aside and renamed into place: a server opening a version never reads half a file."""
    path = index_dir / SUPPLIED_FILE
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(calibration.to_dict(), indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def described(calibration: Calibration | None, note: str) -> dict[str, Any]:
    """What `index status` and GET /index/status show: the calibration's identity, sample size and fit
    quality, or why there is none."""
    if calibration is None:
        return {"calibrated": False, "note": note}
    return {"calibrated": True, "note": note, **calibration.summary()}


def served_calibration(
    index_dir: Path, stored: dict[str, Any] | None, fingerprint: str, note: str
) -> tuple[Calibration | None, str]:
    """What a version answers with: a supplied calibration of its encoding first, then its own; else
    None and why."""
    supplied = read_supplied(index_dir)
    if supplied is not None and supplied.encoding_fingerprint == fingerprint:
        return supplied, f"supplied calibration {supplied.id}"
    if stored is not None:
        calibration = Calibration.from_dict(stored)
        return calibration, note or f"self-calibrated on {calibration.samples} answers"
    return None, note or "uncalibrated"
