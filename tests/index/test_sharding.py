"""Location shards: S2 cell ids, the partition, routing by a location prior, the merge of per-shard lists,
per-shard re-ranking, and a sharded index answering exactly as an unsharded one on the shared images."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from index_builder.builder import BuildConfig
from index_builder.global_index import GlobalIndexConfig
from index_builder.s2cells import leaf_cell_id
from index_builder.search import Localizer
from index_builder.shard_search import Candidates, merge, ordered, rerank_counts
from index_builder.sharding import (
    CELL_ID_END,
    BoundingBox,
    LocationPrior,
    Reference,
    haversine_m,
    partition,
    shards_for,
)
from index_builder.status import index_status
from index_builder.store import IndexVersion
from model.matching import mnn_scores
from model.matching.precision import Precision
from tests.helpers import place_location

# --- S2 cell ids ------------------------------------------------------------------------------------


def test_leaf_cell_ids_equal_the_s2sphere_package():
    s2sphere = pytest.importorskip("s2sphere")  # a dev dependency: the reference implementation
    rng = random.Random(7)
    points = [(rng.uniform(-90, 90), rng.uniform(-180, 180)) for _ in range(2000)]
    points += [(0.0, 0.0), (90.0, 0.0), (-90.0, 0.0), (0.0, 180.0), (0.0, -180.0), (35.6593, 139.6984)]
    points += [(45.0, 45.0), (-27.4772, 153.0281), (0.0, 90.0), (0.0, -90.0)]  # face edges and corners
    for lat, lon in points:
        expected = s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(lat, lon)).id()
        assert leaf_cell_id(lat, lon) == expected, (lat, lon)


def test_leaf_cell_ids_known_values_and_bad_input():
    # face 0 centre; the Tokyo photo of the shared images (values from the s2sphere package)
    assert leaf_cell_id(0.0, 0.0) == 0x1000000000000001
    assert leaf_cell_id(35.6593, 139.6984) >> 61 == 3  # face 3 holds east Asia
    with pytest.raises(ValueError, match="latitude/longitude"):
        leaf_cell_id(91.0, 0.0)
    with pytest.raises(ValueError, match="latitude/longitude"):
        leaf_cell_id(float("nan"), 0.0)


# --- partition --------------------------------------------------------------------------------------


def _references(n_located: int, n_unlocated: int, seed: int = 0) -> list[Reference]:
    rng = random.Random(seed)
    refs = [Reference(i, f"hash{i}", rng.uniform(-60, 60), rng.uniform(-170, 170)) for i in range(n_located)]
    refs += [Reference(n_located + i, f"plain{i}", None, None) for i in range(n_unlocated)]
    return refs


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_partition_balances_located_references_into_cell_ranges(n):
    refs = _references(400, 40)
    part = partition(refs, n)
    assert len(part.shards) == n and (part.assignment >= 0).all()
    assert [s.key for s in part.shards] == [f"shard-{k:02d}" for k in range(n)]
    assert sum(s.count for s in part.shards) == len(refs)
    # the ranges tile the whole id space, in order
    assert part.shards[0].cell_start == 0 and part.shards[-1].cell_end == CELL_ID_END
    for a, b in zip(part.shards, part.shards[1:], strict=False):
        assert a.cell_end == b.cell_start
    for ref in refs[:400]:
        shard = part.shards[part.assignment[ref.id]]
        assert shard.cell_start <= leaf_cell_id(ref.lat, ref.lon) < shard.cell_end
        box = shard.box
        assert box.lat_min <= ref.lat <= box.lat_max and box.lon_min <= ref.lon <= box.lon_max
    located = [s.located for s in part.shards]
    assert max(located) - min(located) <= 1  # 400 distinct cells: cut exactly
    assert sum(located) == 400


def test_partition_never_splits_one_cell_and_hashes_unlocated_stably():
    same_place = [Reference(i, f"h{i}", 10.0, 20.0) for i in range(10)]
    others = [Reference(10 + i, f"o{i}", 11.0 + i, 21.0) for i in range(2)]
    unlocated = [Reference(12 + i, f"u{i}", None, None) for i in range(30)]
    part = partition(same_place + others + unlocated, 4)
    assert len({int(part.assignment[i]) for i in range(10)}) == 1  # one cell, one shard
    again = partition(list(reversed(same_place + others + unlocated)), 4)
    assert (again.assignment == part.assignment).all()  # the order given does not matter
    # an unlocated reference's shard depends on its content only, not on the others
    alone = partition([Reference(0, "u3", None, None)], 4)
    assert alone.assignment[0] == part.assignment[15]
    assert len(set(part.assignment[12:].tolist())) > 1  # spread over shards
    with pytest.raises(ValueError, match="between 1 and"):
        partition(same_place, 0)


def test_partition_with_fewer_places_than_shards_leaves_shards_empty_not_broken():
    part = partition([Reference(0, "a", 1.0, 1.0), Reference(1, "b", 1.0, 1.0)], 3)
    assert sum(s.count for s in part.shards) == 2
    assert sorted(s.located for s in part.shards) == [0, 0, 2]
    assert all(s.cell_start <= s.cell_end for s in part.shards)


# --- routing by a location prior --------------------------------------------------------------------


def _sampled_distance(box: BoundingBox, lat: float, lon: float, steps: int = 400) -> float:
    """The nearest of many points along the box's edges (0 inside it)."""
    if box.lat_min <= lat <= box.lat_max and box.lon_min <= lon <= box.lon_max:
        return 0.0
    lats, lons = np.linspace(box.lat_min, box.lat_max, steps), np.linspace(box.lon_min, box.lon_max, steps)
    edges = [(a, b) for a in lats for b in (box.lon_min, box.lon_max)]
    edges += [(a, b) for b in lons for a in (box.lat_min, box.lat_max)]
    return min(haversine_m(lat, lon, a, b) for a, b in edges)


def test_box_distance_is_the_nearest_point_of_the_box():
    rng = random.Random(3)
    for _ in range(150):
        lat0, lon0 = rng.uniform(-70, 60), rng.uniform(-170, 150)
        box = BoundingBox(lat0, lat0 + rng.uniform(0, 20), lon0, lon0 + rng.uniform(0, 20))
        lat, lon = rng.uniform(-89, 89), rng.uniform(-180, 180)
        exact = box.distance_m(lat, lon)
        sampled = _sampled_distance(box, lat, lon)
        assert exact <= sampled + 1.0  # never more than a point of the box: no shard wrongly skipped
        assert exact >= sampled - 3_000.0  # and the nearest one (edges sampled every 5.5 km at most)
    inside = BoundingBox(0, 1, 0, 1)
    assert inside.distance_m(0.5, 0.5) == 0.0
    assert inside.distance_m(2.0, 0.5) == pytest.approx(haversine_m(2.0, 0.5, 1.0, 0.5))


def test_prior_selects_the_shards_that_can_hold_references_within_the_radius():
    refs = [Reference(i, f"h{i}", -27.47 + 0.01 * (i // 4), 153.02) for i in range(16)]
    refs += [Reference(16, "nowhere", None, None)]
    part = partition(refs, 4)
    assert shards_for(part.shards, None) == [0, 1, 2, 3]
    for ref in refs[:16]:
        near = shards_for(part.shards, LocationPrior(ref.lat, ref.lon, 10.0))
        assert int(part.assignment[ref.id]) in near
    far = LocationPrior(48.85, 2.35, 50_000.0)  # Paris: nothing within 50 km
    assert shards_for(part.shards, far) == []
    everything = LocationPrior(-27.45, 153.02, 100_000.0)
    assert shards_for(part.shards, everything) == [k for k, s in enumerate(part.shards) if s.located]
    with pytest.raises(ValueError, match="radius_m"):
        LocationPrior(0, 0, 0)
    with pytest.raises(ValueError, match="latitude"):
        LocationPrior(100, 0, 10)


# --- merge and per-shard re-ranking -----------------------------------------------------------------


def _candidates(scores, ids, shard) -> Candidates:
    return ordered(np.asarray(scores, np.float32), np.asarray(ids, np.int64), np.full(len(ids), shard))


def test_merge_orders_by_score_then_id_and_keeps_the_owner():
    a = _candidates([0.9, 0.5, 0.5], [4, 9, 1], 0)
    b = _candidates([0.7, 0.5, 0.2], [3, 2, 8], 1)
    merged = merge([a, b], 5)
    assert merged.ids.tolist() == [4, 3, 1, 2, 9]  # the 0.5 tie goes by id across shards
    assert merged.shards.tolist() == [0, 1, 0, 1, 0]
    assert merge([a, b], 100).ids.tolist() == [4, 3, 1, 2, 9, 8]
    assert len(merge([], 3)) == 0
    assert _candidates([0.3, 0.8], [-1, 5], 0).ids.tolist() == [5]  # an approximate index's -1 dropped


def test_merged_shard_tops_equal_the_top_of_everything_with_many_ties():
    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(1, 60))
        scores = rng.integers(0, 6, n).astype(np.float32) / 5  # few distinct values: many ties
        ids = rng.permutation(1000)[:n]
        shard_of = rng.integers(0, 4, n)
        k = int(rng.integers(1, 20))
        whole = ordered(scores, ids, shard_of).head(k)
        tops = [
            ordered(scores[shard_of == s], ids[shard_of == s], np.full((shard_of == s).sum(), s)).head(k)
            for s in range(4)
        ]
        merged = merge(tops, k)
        assert merged.ids.tolist() == whole.ids.tolist(), trial
        assert merged.shards.tolist() == whole.shards.tolist(), trial


@pytest.mark.parametrize("precision", ["float32", "int8", "int8+float32"])
def test_per_shard_counts_equal_one_count_over_all_candidates(precision):
    query = torch.nn.functional.normalize(torch.randn(6, 6, 16), dim=-1)
    base = torch.nn.functional.normalize(torch.randn(24, 6, 6, 16), dim=-1)
    maps = torch.nn.functional.normalize(base + 0.9 * query, dim=-1)  # near-ties to exercise recounts
    shard_of = np.arange(24) % 3
    candidates = Candidates(np.linspace(1, 0, 24, dtype=np.float32), np.arange(24), shard_of.astype(np.int32))
    asked = []

    def count(ids_by_shard, mode):
        asked.append({s: ids.tolist() for s, ids in ids_by_shard.items()})
        for shard, ids in ids_by_shard.items():
            assert (shard_of[ids] == shard).all()  # each shard counts only its own candidates
        return {s: mnn_scores(query, maps[torch.from_numpy(ids)], mode) for s, ids in ids_by_shard.items()}

    counted = rerank_counts(candidates, count, Precision(precision))
    expected = mnn_scores(query, maps, precision)
    assert counted.counts.tolist() == expected.tolist() and not counted.missing
    if precision == "int8+float32":
        assert len(asked) > 1  # an int8 pass, then float32 recounts


def test_a_shard_that_does_not_answer_is_missing_and_its_candidates_marked():
    query = torch.nn.functional.normalize(torch.randn(4, 4, 8), dim=-1)
    maps = torch.nn.functional.normalize(torch.randn(6, 4, 4, 8), dim=-1)
    candidates = Candidates(np.linspace(1, 0, 6, dtype=np.float32), np.arange(6), np.array([0, 1] * 3))

    def count(ids_by_shard, mode):
        return {
            s: mnn_scores(query, maps[torch.from_numpy(ids)], mode) for s, ids in ids_by_shard.items() if s
        }

    counted = rerank_counts(candidates, count, Precision.FLOAT32)
    assert counted.missing == {0}
    assert (counted.counts[[0, 2, 4]] == -1).all() and (counted.counts[[1, 3, 5]] >= 0).all()


# --- the sharded index on the shared images ---------------------------------------------------------


@pytest.fixture(scope="module")
def shared_indexes(sharded_shared_indexes):
    return sharded_shared_indexes


def _comparable(result) -> dict:
    data = result.model_dump()
    del data["timings_ms"], data["index_version"]
    return data


def test_sharded_index_records_its_shards_in_the_manifest(shared_indexes):
    dirs, *_ = shared_indexes
    for shards in (2, 4):
        version = IndexVersion.open_current(dirs[shards])
        plans = version.manifest.location_shards
        assert len(plans) == shards and sum(p.count for p in plans) == 32
        assert sum(p.located for p in plans) == 31  # the triplets, and the Tokyo query by its EXIF
        manifest = json.loads((version.dir / "manifest.json").read_text())
        for plan in plans:
            assert f"{plan.key}.faiss" in manifest["files"] and f"{plan.key}.ids.npy" in manifest["files"]
        status = index_status(dirs[shards], verify=True)
        assert [s["count"] for s in status["location_shards"]] == [p.count for p in plans]
        assert status["verification"]["ok"]  # the shards' files are checksummed with the version
    assert IndexVersion.open_current(dirs[1]).manifest.location_shards == []
    assert index_status(dirs[1])["location_shards"] == []


@pytest.mark.parametrize("shards", [2, 4])
def test_sharded_answers_equal_unsharded_answers(shared_indexes, shards):
    dirs, extractor, queries, (global_desc, local) = shared_indexes
    unsharded = Localizer(IndexVersion.open_current(dirs[1]), extractor)
    sharded = Localizer(IndexVersion.open_current(dirs[shards]), extractor)
    for top_k, rerank_k in ((32, 100), (3, 7)):  # all 32 re-ranked and listed; a cut inside
        expected = unsharded.search(global_desc, local, top_k, rerank_k)
        got = sharded.search(global_desc, local, top_k, rerank_k)
        for query, a, b in zip(queries, expected, got, strict=True):
            assert _comparable(b) == _comparable(a), (query.name, top_k, rerank_k)
            assert len(a.matches) == top_k


def test_a_prior_searches_only_the_nearby_shards(shared_indexes):
    dirs, extractor, _, (global_desc, local) = shared_indexes
    version = IndexVersion.open_current(dirs[4])
    localizer = Localizer(version, extractor)
    by_id = {r.id: r for r in version.all_records()}
    lat, lon = place_location(0)
    prior = LocationPrior(lat, lon, 30.0)  # place 0 only: the next is 100 m away
    (result,) = localizer.search(global_desc[:1], local[:1], 32, 32, [prior])
    near = shards_for(version.manifest.location_shards, prior)
    assert 1 <= len(near) < 4
    assert not result.partial and result.coverage == 1.0
    searched_ids = set()
    for k in near:
        searched_ids |= set(np.load(version.dir / f"shard-{k:02d}.ids.npy").tolist())
    assert {m.id for m in result.matches} == searched_ids
    place0 = {i for i, r in by_id.items() if r.path.startswith("matching_triplets/p0/")}
    assert place0 <= searched_ids
    far = LocationPrior(35.0, 139.0, 1_000.0)
    (nothing,) = localizer.search(global_desc[:1], local[:1], 5, 10, [far])
    assert nothing.matches == [] and nothing.coverage == 1.0 and not nothing.partial
    assert math.isclose(haversine_m(lat, lon, *place_location(1)), 100.0, rel_tol=0.01)


def test_sharding_needs_exact_search_and_a_sane_count(tmp_path):
    with pytest.raises(ValueError, match="exact per-shard search"):
        BuildConfig(tmp_path, tmp_path, shards=2, global_index=GlobalIndexConfig(kind="hnsw"))
    with pytest.raises(ValueError, match="between 1 and"):
        BuildConfig(tmp_path, tmp_path, shards=1000)
