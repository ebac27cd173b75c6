"""Which way of fitting the probability generalizes to queries: alternatives chosen on half of the
places, reported on the other half (docs/benchmarks.md, "Knowing when the answer is wrong").

Input: the per-query answers `python -m bench.calibration --perturbed-variants N --raw FILE` wrote (the
calibration's features of each query's answer, right or wrong, its photo; and each database's
self-calibration sample). Every alternative is fitted, as the build does, on the database's own
self-calibration sample only; queries never enter a fit. The queries' labels serve only to choose one
alternative, on the places of the choice half, by Brier score (a proper score: less noisy than the ECE
at these sizes); the report half's places never take part in the choice. Figures are for the
re-ranked answer (what /localize serves).

    python -m bench.calibration_choice RAW.json [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import emit
from index_builder.calibration import (
    FEATURES,
    LogisticModel,
    average_precision,
    bootstrap_interval,
    bootstrap_samples,
    ece_if_calibrated,
    expected_calibration_error,
    fit_logistic,
    refit_bias,
    threshold_for_precision,
)

CHOICE_PLACES = {0, 2, 4, 6, 8}  # campus 0, 2, 8 and trail 4, 6; the report half: 1, 3, 9 and 5, 7
STAGE = "reranked"
Predictor = Callable[[np.ndarray], np.ndarray]  # features (n, F) -> probabilities


@dataclass
class Sample:
    """A database's self-calibration answers of the re-ranked stage."""

    x: np.ndarray
    y: np.ndarray
    leave_one_out: np.ndarray  # False: a place-removed answer


def self_sample(rows: list) -> Sample:
    rows = [r for r in rows if r[0] == STAGE]
    return Sample(
        np.array([r[1] for r in rows], dtype=np.float64),
        np.array([r[2] for r in rows], dtype=np.float64),
        np.array([r[3] for r in rows], dtype=bool),
    )


def logistic(
    l2: float = 1.0, refit: bool = True, place_removed: bool = True, columns: tuple[int, ...] = (0, 1, 2)
) -> Callable[[Sample], Predictor]:
    """The build's fit (calibration._fit_stage) with one thing changed: the L2 strength, the bias refit
    on the leave-one-out answers, the place-removed answers, or the features used."""

    def fit(sample: Sample) -> Predictor:
        keep = np.ones(len(sample.y), dtype=bool) if place_removed else sample.leave_one_out
        x, y = sample.x[keep][:, columns], sample.y[keep]
        names = tuple(FEATURES[STAGE][c] for c in columns)
        model: LogisticModel = fit_logistic(x, y, names, l2=l2)
        if refit:
            model = refit_bias(
                model, sample.x[sample.leave_one_out][:, columns], sample.y[sample.leave_one_out]
            )
        return lambda queries: model.predict(queries[:, columns])

    return fit


def isotonic(sample_fit: Callable[[Sample], Predictor]) -> Callable[[Sample], Predictor]:
    """The logistic score's order kept, its values replaced by a pool-adjacent-violators fit on the
    leave-one-out answers (with Laplace's rule per block, so a block of all right answers is not 1)."""

    def fit(sample: Sample) -> Predictor:
        score = sample_fit(sample)
        p = score(sample.x[sample.leave_one_out])
        y = sample.y[sample.leave_one_out]
        order = np.argsort(p, kind="stable")
        knots, values = _pool_adjacent_violators(p[order], y[order])
        return lambda queries: np.interp(score(queries), knots, values)

    return fit


def _pool_adjacent_violators(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    blocks: list[list[float]] = []  # [sum of y, count, mean p]
    for pi, yi in zip(p, y, strict=True):
        blocks.append([yi, 1.0, pi])
        while len(blocks) > 1 and _rate(blocks[-2]) >= _rate(blocks[-1]):
            right, count, mean = blocks.pop()
            blocks[-1] = [
                blocks[-1][0] + right,
                blocks[-1][1] + count,
                (blocks[-1][2] * blocks[-1][1] + mean * count) / (blocks[-1][1] + count),
            ]
    return np.array([b[2] for b in blocks]), np.array([_rate(b) for b in blocks])


def _rate(block: list[float]) -> float:
    return (block[0] + 1.0) / (block[1] + 2.0)


ALTERNATIVES: dict[str, Callable[[Sample], Predictor]] = {
    "build (L2 1, bias refit, place removed, 3 features)": logistic(),
    "L2 0.3": logistic(l2=0.3),
    "L2 3": logistic(l2=3.0),
    "L2 10": logistic(l2=10.0),
    "no bias refit": logistic(refit=False),
    "leave-one-out answers only": logistic(place_removed=False),
    "share only": logistic(columns=(0,)),
    "log_ratio only": logistic(columns=(1,)),
    "share + log_ratio": logistic(columns=(0, 1)),
    "log_ratio + global_gap": logistic(columns=(1, 2)),
    "isotonic on the build's score": isotonic(logistic()),
}


@dataclass
class Queries:
    """Queries of one kind (real or perturbed) across the three views, with each alternative's p."""

    photo: list[str]
    place: np.ndarray
    right: np.ndarray
    confidence: np.ndarray
    global_score: np.ndarray
    probability: dict[str, np.ndarray]
    removed_probability: dict[str, np.ndarray]  # the same queries with their true places removed

    def part(self, keep: np.ndarray) -> Queries:
        return Queries(
            [p for p, k in zip(self.photo, keep, strict=True) if k],
            self.place[keep],
            self.right[keep],
            self.confidence[keep],
            self.global_score[keep],
            {name: p[keep] for name, p in self.probability.items()},
            {name: p[keep] for name, p in self.removed_probability.items()},
        )


def queries_of(raw: dict, kind: str, other_samples: dict[str, dict]) -> Queries:
    """`other_samples`: name -> another bench run's raw answers, whose self-calibration samples (drawn
    another way) are fitted the build's way: one more alternative each."""
    parts = []
    for view in ("i0", "i1", "i2"):
        data = raw[f"{kind} {view}"]
        sample = self_sample(raw[f"self-calibration {view}"])
        fitted = {name: fit(sample) for name, fit in ALTERNATIVES.items()}
        for name, other in other_samples.items():
            fitted[name] = logistic()(self_sample(other[f"self-calibration {view}"]))
        x = np.array(data["features"][STAGE], dtype=np.float64)
        removed = np.array(data["place_removed"]["features"][STAGE], dtype=np.float64)
        parts.append((data, {n: f(x) for n, f in fitted.items()}, {n: f(removed) for n, f in fitted.items()}))
    photos = [p for data, _, _ in parts for p in data["photo"]]
    return Queries(
        photos,
        np.array([int(p.split("_")[0][1:]) for p in photos]),
        np.concatenate([np.array(d["right"][STAGE], dtype=bool) for d, _, _ in parts]),
        np.concatenate([np.array(d["confidence"], dtype=np.float64) for d, _, _ in parts]),
        np.concatenate([np.array(d["global_score"][STAGE], dtype=np.float64) for d, _, _ in parts]),
        {name: np.concatenate([p[name] for _, p, _ in parts]) for name in parts[0][1]},
        {name: np.concatenate([r[name] for _, _, r in parts]) for name in parts[0][1]},
    )


def served_difference(raw: dict, kind: str, q: Queries) -> float:
    """Largest |baseline p - the p the evaluation served|: 0 shows the baseline is the build's fit."""
    served = np.concatenate([raw[f"{kind} {v}"]["probability"][STAGE] for v in ("i0", "i1", "i2")])
    return float(np.abs(q.probability[next(iter(ALTERNATIVES))] - served).max())


def rejected(q: Queries, name: str, precision: float = 0.95) -> float | None:
    """Share of the place-removed answers below the threshold giving `precision` on the normal ones."""
    threshold = threshold_for_precision(q.probability[name], q.right, precision)
    return None if threshold is None else round(float(np.mean(q.removed_probability[name] < threshold)), 4)


def brier(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((p - y) ** 2))


def figures(q: Queries, name: str) -> dict:
    """ECE (interval, noise), Brier and AUC-PR (intervals) of one alternative; photos resampled whole."""
    p, y, n = q.probability[name], q.right.astype(np.float64), len(q.right)
    relevant = n  # every query's place is in its database

    def auc(score: np.ndarray) -> Callable[[np.ndarray], float]:
        return lambda i: average_precision(score[i], q.right[i], relevant)

    return {
        "ece": round(expected_calibration_error(p, y), 4),
        "ece_interval": bootstrap_interval(lambda i: expected_calibration_error(p[i], y[i]), n, q.photo),
        "ece_if_calibrated": ece_if_calibrated(p),
        "brier": round(brier(p, y), 4),
        "brier_interval": bootstrap_interval(lambda i: brier(p[i], y[i]), n, q.photo),
        "auc_pr": round(auc(p)(np.arange(n)), 4),
        "auc_pr_interval": bootstrap_interval(auc(p), n, q.photo),
        "rejected_with_place_removed": rejected(q, name),
    }


def paired(q: Queries, chosen: str, baseline: str) -> dict:
    """Chosen minus baseline, Brier and ECE, on the same resamples of photos."""
    y = q.right.astype(np.float64)
    out = {}
    for metric, f in (("brier", brier), ("ece", expected_calibration_error)):
        a, b = q.probability[chosen], q.probability[baseline]
        draws = np.array([f(a[i], y[i]) - f(b[i], y[i]) for i in bootstrap_samples(len(y), q.photo)])
        out[metric] = {
            "difference": round(f(a, y) - f(b, y), 4),
            "interval": [round(float(np.quantile(draws, t)), 4) + 0.0 for t in (0.025, 0.975)],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.calibration_choice", description=__doc__.split("\n")[0]
    )
    parser.add_argument("raw", type=Path)
    parser.add_argument(
        "--sample",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "RAW"),
        help="another run's self-calibration samples (e.g. --candidates 100) as the alternative NAME",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    raw = json.loads(args.raw.read_text())
    others = {name: json.loads(Path(path).read_text()) for name, path in args.sample}
    kinds = [k for k in ("real", "perturbed") if f"{k} i0" in raw]
    every = {kind: queries_of(raw, kind, others) for kind in kinds}
    names = list(every[kinds[0]].probability)
    choice = {kind: q.part(np.isin(q.place, list(CHOICE_PLACES))) for kind, q in every.items()}
    report = {kind: q.part(~np.isin(q.place, list(CHOICE_PLACES))) for kind, q in every.items()}
    # the choice: Brier score over the choice half's real and perturbed queries together
    pooled_brier = {
        name: round(
            brier(
                np.concatenate([choice[k].probability[name] for k in kinds]),
                np.concatenate([choice[k].right for k in kinds]).astype(np.float64),
            ),
            4,
        )
        for name in names
    }
    baseline = next(iter(ALTERNATIVES))
    chosen = min(pooled_brier, key=lambda name: (pooled_brier[name], name != baseline))
    differences = {kind: paired(q, chosen, baseline) for kind, q in report.items()}
    emit(
        {
            "baseline_is_the_served_probability": {
                kind: served_difference(raw, kind, q) < 1e-9 for kind, q in every.items()
            },
            "choice_places": sorted(CHOICE_PLACES),
            "report_places": sorted(set(range(10)) - CHOICE_PLACES),
            "choice_brier": pooled_brier,
            "choice_ece": {
                kind: {
                    name: round(expected_calibration_error(q.probability[name], q.right), 4) for name in names
                }
                for kind, q in choice.items()
            },
            "chosen": chosen,
            # adopted only where it is better beyond noise: the Brier difference's whole interval below 0
            # on the report half, for real and perturbed queries alike
            "adopt": chosen != baseline and all(d["brier"]["interval"][1] < 0 for d in differences.values()),
            "report": {
                kind: {
                    "queries": len(q.right),
                    "photos": len(set(q.photo)),
                    "baseline": figures(q, baseline),
                    "chosen": figures(q, chosen),
                    "chosen_minus_baseline": differences[kind],
                    "auc_pr_by_confidence": round(average_precision(q.confidence, q.right, len(q.right)), 4),
                    "auc_pr_by_global_score": round(
                        average_precision(q.global_score, q.right, len(q.right)), 4
                    ),
                }
                for kind, q in report.items()
            },
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
