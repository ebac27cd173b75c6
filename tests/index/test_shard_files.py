"""Location shards own their files: a sharded build puts each shard's maps in segments of its own and
writes each shard an id table, a shard's server opens only those (and answers the same with every other
shard's files and the version-wide id map gone), versions written before keep being served, and an
incremental build leaves the other shard's feature files alone."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from index_builder.builder import BuildConfig, build_index
from index_builder.shard_search import ShardSearcher
from index_builder.sharding import Reference, ShardPlan, partition
from index_builder.store import IndexStoreError, IndexVersion, current_version_name, segment_dir, sha256_file
from index_builder.store.integrity import verify_version
from index_builder.store.location_shards import index_file, rows_file, write_location_shards
from index_builder.store.metadata import METADATA_FILE
from index_builder.store.versions import GLOBAL_INDEX_FILE
from model.matching.precision import Precision
from tests.helpers import mirrored_jpeg, place_location


def _copy(index_dir: Path, to: Path) -> Path:
    shutil.copytree(index_dir, to)
    return to


def _answers(searcher: ShardSearcher, features) -> list[tuple[list, list, list]]:
    """Per query: the shard's top 16 (scores, ids) and the MNN counts of its own candidates."""
    global_desc, local = features
    answers = []
    for query, candidates in enumerate(searcher.top(global_desc.numpy(), 16)):
        counts = searcher.counts(local[query], candidates.ids.tolist(), Precision.FLOAT32)
        answers.append((candidates.scores.tolist(), candidates.ids.tolist(), counts.tolist()))
    return answers


def _shard_files(version_dir: Path, key: str) -> list[Path]:
    return sorted(version_dir.glob(f"{key}.*"))


def test_each_shard_owns_its_segments_and_an_id_table(sharded_shared_indexes):
    dirs, *_ = sharded_shared_indexes
    for shards in (2, 4):
        version = IndexVersion.open_current(dirs[shards])
        plans = version.manifest.location_shards
        manifest = json.loads((version.dir / "manifest.json").read_text())
        assert manifest["format_version"] == 3
        owned = [set(plan.segments) for plan in plans]
        assert all(owned) and sum(len(s) for s in owned) == len(set().union(*owned))  # disjoint
        assert set().union(*owned) == {s.name for s in version.manifest.segments}
        records = version.all_records()
        for k, plan in enumerate(plans):
            assert rows_file(plan.key) in manifest["files"]  # checksummed with the version
            ids = np.load(version.dir / f"{plan.key}.ids.npy")
            table = np.load(version.dir / rows_file(plan.key))
            assert table.shape == (plan.count, 2)
            for ref_id, (segment, row) in zip(ids.tolist(), table.tolist(), strict=True):
                assert (records[ref_id].segment, records[ref_id].row) == (plan.segments[segment], row), k
        version.close()
    assert (
        json.loads((IndexVersion.open_current(dirs[1]).dir / "manifest.json").read_text())["format_version"]
        == 2
    )  # nothing sharded: older releases still read it


def test_a_shard_server_answers_the_same_without_the_other_shards_files(sharded_shared_indexes, tmp_path):
    dirs, _, _, features = sharded_shared_indexes
    index_dir = _copy(dirs[2], tmp_path / "index")
    name = current_version_name(index_dir)
    version_dir = index_dir / "versions" / name
    whole = IndexVersion(index_dir, name)
    plans = whole.manifest.location_shards
    before = [_answers(ShardSearcher.open_alone(index_dir, name, k), features) for k in range(2)]
    whole.close()
    for position, other in ((0, 1), (1, 0)):
        alone = _copy(index_dir, tmp_path / f"alone-{position}")
        alone_version = alone / "versions" / name
        for path in _shard_files(alone_version, plans[other].key):
            path.unlink()
        for segment in plans[other].segments:
            shutil.rmtree(segment_dir(alone, segment))
        (alone_version / METADATA_FILE).unlink()
        (alone_version / GLOBAL_INDEX_FILE).unlink()
        searcher = ShardSearcher.open_alone(alone, name, position)
        assert searcher.version.segment_names == list(plans[position].segments)
        assert _answers(searcher, features) == before[position]
        other_id = int(np.load(version_dir / f"{plans[other].key}.ids.npy")[0])
        with pytest.raises(IndexStoreError, match="not in this location shard"):
            searcher.counts(features[1][0], [other_id], Precision.FLOAT32)
        with pytest.raises(IndexStoreError, match="no image records"):
            searcher.version.records([0])
        searcher.version.close()


def test_a_damaged_id_table_is_a_clear_error(sharded_shared_indexes, tmp_path):
    dirs, *_ = sharded_shared_indexes
    index_dir = _copy(dirs[2], tmp_path / "index")
    name = current_version_name(index_dir)
    table = index_dir / "versions" / name / rows_file("shard-00")
    rows = np.load(table)
    np.save(table, np.concatenate([rows, rows], axis=1))
    with pytest.raises(IndexStoreError, match="shard-00 does not match its manifest"):
        ShardSearcher.open_alone(index_dir, name, 0)
    manifest = IndexVersion(index_dir, name, load_global=False, shard=1).manifest
    checked = verify_version(index_dir, manifest)
    assert checked.problems == [f"checksum mismatch versions/{name}/shard-00.rows.npy"]
    np.save(table, np.array([{"a": 1}] * len(rows), dtype=object), allow_pickle=True)
    with pytest.raises(IndexStoreError, match="shard-00 is damaged"):  # never unpickled
        ShardSearcher.open_alone(index_dir, name, 0)
    rows[0, 0] = 99
    np.save(table, rows)
    with pytest.raises(IndexStoreError, match="out of range"):
        ShardSearcher.open_alone(index_dir, name, 0)
    with pytest.raises(IndexStoreError, match="has 2 location shards, not shard-02"):
        ShardSearcher.open_alone(index_dir, name, 2)


def _write_shared_layout(index_dir: Path, shards: int) -> None:
    """Make the published unsharded version a sharded one as builds wrote them before shards owned their
    files: the shards' index and ids only, over the version's shared segments (no id tables)."""
    version = IndexVersion.open_current(index_dir)
    records = version.all_records()
    references = [Reference(r.id, r.content_hash, r.lat, r.lon) for r in records]
    split = partition(references, shards)
    descriptors = version.index.reconstruct_n(0, len(records))
    written = write_location_shards(version.dir, split, descriptors, version.manifest.global_index, records)
    manifest_path = version.dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 2
    manifest["location_shards"] = [
        {k: v for k, v in s.to_dict().items() if k != "segments"} for s in split.shards
    ]
    manifest["files"] |= {f: sha256_file(version.dir / f) for f in written}
    manifest_path.write_text(json.dumps(manifest))
    version.close()


def test_a_version_written_before_shards_owned_their_files_is_served_from_its_id_map(
    sharded_shared_indexes, tmp_path
):
    dirs, _, _, features = sharded_shared_indexes
    old = _copy(dirs[1], tmp_path / "old")
    _write_shared_layout(old, 2)
    name, new_name = current_version_name(old), current_version_name(dirs[2])
    plans = IndexVersion(old, name, load_global=False).manifest.location_shards
    assert not any(plan.owns_files for plan in plans)
    assert not list((old / "versions" / name).glob("*.rows.npy"))
    for position in range(2):
        searcher = ShardSearcher.open_alone(old, name, position)
        assert searcher.version.db is not None  # its rows of meta.sqlite, as before
        owning = ShardSearcher.open_alone(dirs[2], new_name, position)
        assert searcher.ids.tolist() == owning.ids.tolist()  # the same partition
        assert _answers(searcher, features) == _answers(owning, features)
        searcher.version.close()
        owning.version.close()


def test_shard_plans_without_segments_read_from_older_manifests():
    plan = ShardPlan("shard-00", 0, 10, 3, 3, None)
    data = {k: v for k, v in plan.to_dict().items() if k != "segments"}
    assert ShardPlan.from_dict(data) == plan and not plan.owns_files
    owning = dataclasses.replace(plan, segments=("g-1", "g-2"))
    assert ShardPlan.from_dict(json.loads(json.dumps(owning.to_dict()))) == owning and owning.owns_files


def test_an_incremental_build_leaves_the_other_shards_feature_files_alone(sharded_shared_indexes, tmp_path):
    """A photo added at place 0 is encoded into a segment of place 0's shard; every reference that stays
    in its shard keeps its segment and row, the other shard's segments stay its own, unchanged."""
    dirs, extractor, queries, _ = sharded_shared_indexes
    refs, index_dir = tmp_path / "refs", _copy(dirs[2], tmp_path / "index")
    shutil.copytree(queries[0].parents[3], refs)
    before = IndexVersion.open_current(index_dir)
    old_records = {r.path: r for r in before.all_records()}
    old_plans = before.manifest.location_shards
    old_shard = {p: k for k in range(2) for p in _paths(before, k)}
    checksums = {s.name: s.files for s in before.manifest.segments}
    before.close()
    (refs / "added").mkdir()
    (refs / "added" / "mirrored.jpg").write_bytes(mirrored_jpeg(queries[0]))
    lat, lon = place_location(0)
    with open(refs / "locations.csv", "a") as f:
        f.write(f"added/mirrored.jpg,{lat},{lon}\n")
    report = build_index(BuildConfig(references=refs, index_dir=index_dir), extractor=extractor)
    assert (report.total, report.encoded) == (33, 1)
    after = IndexVersion.open_current(index_dir)
    plans = after.manifest.location_shards
    records = {r.path: r for r in after.all_records()}
    shard_of = {p: k for k in range(2) for p in _paths(after, k)}
    added_shard = shard_of["added/mirrored.jpg"]
    other = 1 - added_shard
    assert set(old_plans[other].segments) <= set(plans[other].segments)
    for segment in old_plans[other].segments:  # not rewritten
        assert {s.name: s.files for s in after.manifest.segments}[segment] == checksums[segment]
    moved = {p for p in old_records if old_shard[p] != shard_of[p]}
    for path, record in old_records.items():
        if path not in moved:
            assert (records[path].segment, records[path].row) == (record.segment, record.row), path
    new_segments = {s.name for s in after.manifest.segments} - set(checksums)
    new_rows = sum(s.count for s in after.manifest.segments if s.name in new_segments)
    assert new_rows == 1 + len(moved)  # the new photo, and a copy of each reference that changed shard
    for k, plan in enumerate(plans):
        assert {records[p].segment for p in shard_of if shard_of[p] == k} == set(plan.segments)
    after.close()


def _paths(version: IndexVersion, shard: int) -> list[str]:
    ids = np.load(version.dir / f"{version.manifest.location_shards[shard].key}.ids.npy")
    return [r.path for r in version.records(ids.tolist())]


def test_counts_of_a_shard_alone_equal_the_whole_versions(sharded_shared_indexes):
    """The same maps are read through a shard's own table as through meta.sqlite."""
    dirs, *_ = sharded_shared_indexes
    name = current_version_name(dirs[4])
    whole = IndexVersion(dirs[4], name)
    for k, plan in enumerate(whole.manifest.location_shards):
        searcher = ShardSearcher.open_alone(dirs[4], name, k)
        ids = searcher.ids.tolist()
        assert torch.equal(
            torch.from_numpy(searcher.version.read_local(ids)), torch.from_numpy(whole.read_local(ids))
        )
        assert (whole.dir / index_file(plan.key)).is_file()
        searcher.version.close()
    whole.close()
