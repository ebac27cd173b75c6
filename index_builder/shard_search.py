"""Search over location shards, shared by both engines (the single process and Ray Serve):

1. each shard searched returns its exact global top-N (`ShardSearcher.top`);
2. the lists are merged (`merge`): best score first, equal scores by ascending id, which is also the
   order an unsharded search gives, so the merged top-N is the unsharded top-N;
3. each shard counts the MNN matches of its own candidates against the query map (`ShardSearcher.counts`),
   steered by `rerank_counts` (the int8+float32 policy decides its recounts over all candidates at once,
   as an unsharded search does);
4. the counts order the candidates (`model.matching.rerank_order`, stable: equal counts keep step 2's
   order).

An unsharded version is one shard holding everything, so there is one code path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from index_builder.global_index import search as faiss_search
from index_builder.manifest import IndexManifest
from index_builder.sharding import LocationPrior, shard_key, shards_for
from index_builder.store import IndexVersion
from index_builder.store.location_shards import read_location_shard
from index_builder.store.versions import VERSIONS
from model.matching import mnn_scores
from model.matching.precision import Precision
from model.matching.refine import RecountPolicy, refine


@dataclass
class Candidates:
    """One query's global candidates, best score first and equal scores by ascending id."""

    scores: np.ndarray  # (k,) float32 cosine similarities
    ids: np.ndarray  # (k,) int64 ids of the version
    shards: np.ndarray  # (k,) int32 position of the shard holding each

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, k: int) -> Candidates:
        return Candidates(self.scores[:k], self.ids[:k], self.shards[:k])

    def by_shard(self) -> dict[int, np.ndarray]:
        """Shard position -> positions (in this list) of its candidates, in list order."""
        return {int(s): np.nonzero(self.shards == s)[0] for s in np.unique(self.shards)}


def ordered(scores: np.ndarray, ids: np.ndarray, shards: np.ndarray) -> Candidates:
    """Candidates in canonical order; ids < 0 (approximate indexes returning fewer) dropped."""
    keep = ids >= 0
    scores, ids, shards = scores[keep], ids[keep], shards[keep]
    order = np.lexsort((ids, -scores.astype(np.float64)))
    return Candidates(
        scores[order].astype(np.float32), ids[order].astype(np.int64), shards[order].astype(np.int32)
    )


def merge(parts: Sequence[Candidates], k: int) -> Candidates:
    """The top k of several shards' lists: exactly the top k of one search over all their references,
    given that each list is its shard's exact top k (or all of it)."""
    if not parts:
        return Candidates(np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int32))
    return ordered(
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.ids for p in parts]),
        np.concatenate([p.shards for p in parts]),
    ).head(k)


class ShardSearcher:
    """One location shard of an opened version: its global index, and its references' local maps."""

    def __init__(self, version: IndexVersion, position: int, index, ids: np.ndarray) -> None:
        self.version, self.position, self.index, self.ids = version, position, index, ids
        self.key = shard_key(position)

    @classmethod
    def open(cls, version: IndexVersion, position: int) -> ShardSearcher:
        shard = version.manifest.location_shards[position]
        index, ids = read_location_shard(version.dir, shard, version.manifest.global_index)
        return cls(version, position, index, ids)

    @classmethod
    def open_alone(cls, index_dir: Path, version: str, position: int) -> ShardSearcher:
        """One location shard's server (a Ray shard replica): its global index and ids, and its own id
        table and segments; nothing of the other shards, and not the version-wide global index or id map
        (meta.sqlite), unless the version was written before shards owned their files (then its rows of
        the id map). An unsharded version is the one shard, opened whole."""
        if not IndexManifest.read(Path(index_dir) / VERSIONS / version).location_shards:
            return cls.whole(IndexVersion(Path(index_dir), version))
        opened = IndexVersion(Path(index_dir), version, load_global=False, shard=position)
        try:
            return cls.open(opened, position)
        except BaseException:
            opened.close()
            raise

    @classmethod
    def whole(cls, version: IndexVersion) -> ShardSearcher:
        """An unsharded version as one shard (its global index's row i is id i)."""
        return cls(version, 0, version.index, np.arange(len(version), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    def top(self, global_desc: np.ndarray, k: int) -> list[Candidates]:
        """Each query's top k among this shard's references."""
        scores, rows = faiss_search(self.index, global_desc, k)
        shard = np.full(rows.shape[1], self.position, dtype=np.int32)
        return [
            ordered(scores[q], np.where(rows[q] >= 0, self.ids[np.maximum(rows[q], 0)], -1), shard)
            for q in range(len(global_desc))
        ]

    def counts(self, query_local: torch.Tensor, ids: Sequence[int], precision: Precision) -> torch.Tensor:
        """MNN counts of the query map against these references (of this shard), in one fixed precision:
        a candidate's count depends on it and the query only, so it is the same whichever shard counts."""
        device = query_local.device  # where the model ran: a GPU's re-ranking stays on it
        maps = self.version.candidate_maps([int(i) for i in ids], device)
        return mnn_scores(query_local, maps, precision, device=device)


def searchers_of(version: IndexVersion) -> list[ShardSearcher]:
    if not version.manifest.location_shards:
        return [ShardSearcher.whole(version)]
    return [ShardSearcher.open(version, k) for k in range(len(version.manifest.location_shards))]


def shards_to_search(version: IndexVersion, prior: LocationPrior | None) -> list[int]:
    """Positions of the shards a query searches (an unsharded version: its one shard, prior or not)."""
    if not version.manifest.location_shards:
        return [0]
    return shards_for(version.manifest.location_shards, prior)


# shard position -> ids to count there, and the precision -> shard position -> counts in the same order.
# A shard left out of the answer did not answer (a Ray replica that died).
CountFn = Callable[[Mapping[int, np.ndarray], Precision], Mapping[int, torch.Tensor]]


@dataclass
class RerankCounts:
    counts: np.ndarray  # (k,) int64 MNN counts; -1 where the holding shard did not answer
    missing: set[int]  # shard positions that did not answer


def rerank_counts(candidates: Candidates, count: CountFn, precision: Precision) -> RerankCounts:
    """The MNN counts of the candidates, each counted by the shard holding it. int8+float32 counts all in
    int8 first, then recounts in float32 the ones that could reach the top, chosen over all candidates
    exactly as mnn_scores chooses them over one list (model.matching.refine)."""
    counts = np.full(len(candidates), -1, dtype=np.int64)
    missing: set[int] = set()
    groups = candidates.by_shard()

    def count_positions(positions_by_shard: Mapping[int, np.ndarray], mode: Precision) -> None:
        asked = {s: candidates.ids[p] for s, p in positions_by_shard.items() if len(p)}
        answered = count(asked, mode)
        for shard, positions in positions_by_shard.items():
            if shard in answered:
                counts[positions] = np.asarray(answered[shard], dtype=np.int64)
            elif len(positions):
                missing.add(shard)

    refining = precision is Precision.INT8_FLOAT32 and RecountPolicy().budget(len(candidates)) > 0
    if not refining:
        count_positions(groups, Precision.FLOAT32 if precision is Precision.INT8_FLOAT32 else precision)
        return RerankCounts(counts, missing)
    count_positions(groups, Precision.INT8)

    def recount(picked: list[int]) -> torch.Tensor:
        picked_arr = np.asarray(picked, dtype=np.int64)
        holders = candidates.shards[picked_arr]
        by_shard = {int(s): picked_arr[holders == s] for s in np.unique(holders)}
        before = counts[picked_arr].copy()
        count_positions({s: p for s, p in by_shard.items() if len(p)}, Precision.FLOAT32)
        after = counts[picked_arr]
        return torch.from_numpy(np.where(after >= 0, after, before))

    answered = counts >= 0
    if answered.any():
        positions = np.nonzero(answered)[0]
        refined = refine(torch.from_numpy(counts[positions]), lambda p: recount(positions[p].tolist()))
        counts[positions] = refined.counts.numpy()
    return RerankCounts(counts, missing)
