"""Training tuples by SelaVPR's "partial" mining (spec section 6).

Positives are database images within 10 m of a query (queries without any are dropped); images within
25 m are never negatives. Every refresh samples 1000 queries and 1000 database images, computes their
global descriptors in eval mode, and gives each query its nearest positive in descriptor space and the
two nearest sampled database images that are not within 25 m.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.datasets import VPRSplit, within

POSITIVE_M = 10.0
NOT_NEGATIVE_M = 25.0
NEGATIVES = 2


@dataclass
class TrainingTuple:
    query: Path
    positive: Path
    negatives: list[Path]


class TripletMiner:
    def __init__(
        self,
        split: VPRSplit,
        sample_queries: int = 1000,
        sample_database: int = 1000,
        negatives: int = NEGATIVES,
        seed: int = 0,
    ) -> None:
        self.split, self.negatives = split, negatives
        self.sample_queries, self.sample_database = sample_queries, sample_database
        self.rng = np.random.default_rng(seed)
        self.hard = within(split.queries_utm, split.database_utm, POSITIVE_M)
        self.soft = within(split.queries_utm, split.database_utm, NOT_NEGATIVE_M)
        self.trainable = np.array([i for i, p in enumerate(self.hard) if len(p)], dtype=np.int64)
        if not len(self.trainable):
            raise ValueError(f"{split.root}: no query has a database image within {POSITIVE_M} m")

    def mine(self, describe: Callable[[Sequence[Path]], np.ndarray]) -> list[TrainingTuple]:
        """One refresh. `describe` maps image paths to unit global descriptors (eval mode, test path)."""
        queries = self.rng.choice(
            self.trainable, min(self.sample_queries, len(self.trainable)), replace=False
        )
        sampled = self.rng.choice(
            len(self.split.database_paths),
            min(self.sample_database, len(self.split.database_paths)),
            replace=False,
        )
        positives = np.unique(np.concatenate([self.hard[q] for q in queries]))
        database = np.union1d(sampled, positives)
        q_desc = describe([self.split.queries_paths[q] for q in queries])
        db_desc = describe([self.split.database_paths[d] for d in database])
        where = {int(d): i for i, d in enumerate(database)}
        tuples = []
        for row, q in enumerate(queries):
            sims = db_desc @ q_desc[row]
            hard = self.hard[q]
            best = hard[np.argmax(sims[[where[int(p)] for p in hard]])]
            allowed = np.setdiff1d(sampled, self.soft[q])
            if len(allowed) < self.negatives:
                continue
            nearest = allowed[
                np.argsort(-sims[[where[int(d)] for d in allowed]], kind="stable")[: self.negatives]
            ]
            tuples.append(
                TrainingTuple(
                    self.split.queries_paths[q],
                    self.split.database_paths[best],
                    [self.split.database_paths[n] for n in nearest],
                )
            )
        return tuples
