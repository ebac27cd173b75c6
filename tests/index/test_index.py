"""The reference index: incremental versions, crash safety, locations, and search on top of it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from index_builder.builder import BuildConfig, build_index
from index_builder.errors import CheckpointMismatch
from index_builder.global_index import GlobalIndexConfig, build_global_index, search
from index_builder.manifest import EncodingIdentity
from index_builder.search import Localizer
from index_builder.status import index_status
from index_builder.store import (
    SEGMENTS,
    BuildInProgress,
    BuildLock,
    IndexNotFound,
    IndexVersion,
    current_version_name,
    decode_local,
    encode_local,
    sha256_file,
)
from index_builder.store.codec import decode_local_torch
from model.matching import mnn_scores
from model.options import ModelOptions
from tests.helpers import noise_images, tiny_checkpoint


@pytest.fixture
def refs(tmp_path, shared_data) -> Path:
    root = tmp_path / "refs"
    for place in ("p0", "p1", "p2"):
        shutil.copytree(shared_data / "matching_triplets" / place, root / place)
    return root


def build(refs: Path, index_dir: Path, ckpt: Path, model_dtype: str = "float32", **options):
    model = ModelOptions(checkpoint=str(ckpt), device="cpu", model_dtype=model_dtype)
    return build_index(BuildConfig(references=refs, index_dir=index_dir, model=model, **options))


def test_first_build_then_incremental(refs, tmp_path, tiny_ckpt):
    index_dir = tmp_path / "index"
    first = build(refs, index_dir, tiny_ckpt)
    assert first.summary() == {**first.summary(), "version": "v000001", "total": 9, "encoded": 9, "reused": 0}
    assert (first.removed, first.skipped) == (0, 0)
    v1 = IndexVersion.open_current(index_dir)
    before = {r.path: r for r in v1.all_records()}

    (refs / "p2" / "i2").joinpath(next((refs / "p2" / "i2").iterdir()).name).unlink()  # removed
    noise_images(refs / "new", 1)  # new
    changed = next((refs / "p1" / "i0").iterdir())
    noise_images(tmp_path / "other", 1)[0].replace(changed)  # same path, new content
    second = build(refs, index_dir, tiny_ckpt)
    assert second.summary() | {"seconds": 0} == {
        "version": "v000002",
        "total": 9,
        "encoded": 2,
        "reused": 7,
        "removed": 1,
        "skipped": 0,
        "seconds": 0,
    }
    assert current_version_name(index_dir) == "v000002"
    v2 = IndexVersion.open_current(index_dir)
    after = {r.path: r for r in v2.all_records()}
    unchanged = "p0/i0/Image001.jpg"
    assert after[unchanged].added_at == before[unchanged].added_at
    assert after[unchanged].content_hash == before[unchanged].content_hash
    np.testing.assert_array_equal(v2.read_local([after[unchanged].id]), v1.read_local([before[unchanged].id]))
    rel_changed = changed.relative_to(refs).as_posix()
    assert after[rel_changed].content_hash != before[rel_changed].content_hash


def test_nothing_changed_encodes_nothing(refs, tmp_path, tiny_ckpt):
    build(refs, tmp_path / "index", tiny_ckpt)
    again = build(refs, tmp_path / "index", tiny_ckpt)
    assert (again.encoded, again.reused, again.total) == (0, 9, 9)


def test_full_rebuild_and_model_change_reencode_everything(refs, tmp_path, tiny_ckpt):
    build(refs, tmp_path / "index", tiny_ckpt)
    assert build(refs, tmp_path / "index", tiny_ckpt, full=True).encoded == 9
    other = tiny_checkpoint(tmp_path / "other-model", seed=12)
    report = build(refs, tmp_path / "index", other)
    assert (report.encoded, report.reused) == (9, 0)
    manifest = IndexVersion.open_current(tmp_path / "index").manifest
    assert manifest.checkpoint.description == "tiny test model (seed 12)"


def test_identical_content_is_encoded_once(refs, tmp_path, tiny_ckpt):
    shutil.copy(next((refs / "p0" / "i0").iterdir()), refs / "copy.jpg")
    report = build(refs, tmp_path / "index", tiny_ckpt)
    records = {r.path: r for r in IndexVersion.open_current(tmp_path / "index").all_records()}
    assert report.total == 10
    original = records["p0/i0/Image001.jpg"]
    assert (records["copy.jpg"].segment, records["copy.jpg"].row) == (original.segment, original.row)


def test_corrupt_and_empty_files_are_skipped_and_reported(refs, tmp_path, tiny_ckpt):
    good = next((refs / "p0" / "i0").iterdir()).read_bytes()
    (refs / "broken.jpg").write_bytes(good[: len(good) // 3])
    (refs / "empty.png").write_bytes(b"")
    (refs / "text.jpg").write_text("not an image")
    report = build(refs, tmp_path / "index", tiny_ckpt)
    assert (report.total, report.skipped) == (9, 3)
    reasons = {s["path"]: s["reason"] for s in report.skipped_files}
    assert "corrupt or truncated" in reasons["broken.jpg"] and "empty file" in reasons["empty.png"]
    assert "not a recognised image format" in reasons["text.jpg"]


def test_locations_first_found_wins(tmp_path, shared_data, tiny_ckpt):
    refs = tmp_path / "refs"
    refs.mkdir()
    img = shared_data / "matching_triplets" / "p0" / "i0" / "Image001.jpg"
    shutil.copy(img, refs / "@0585155.78@4477324.14@17@T@40.44221@-79.99589@.jpg")  # file name only
    shutil.copy(
        shared_data / "matching_triplets" / "p1" / "i0" / "Image059.jpg", refs / "csv_wins@1@2@17@T@@@.jpg"
    )
    shutil.copy(shared_data / "tokyo_pair" / "tokyo_query.jpg", refs / "exif.jpg")
    shutil.copy(shared_data / "tokyo_pair" / "tokyo_db.png", refs / "nowhere.png")
    (refs / "locations.csv").write_text("path,lat,lon\ncsv_wins@1@2@17@T@@@.jpg,48.8584,2.2945\n")
    report = build(refs, tmp_path / "index", tiny_ckpt)
    assert report.with_location == 3
    records = {r.path: r for r in IndexVersion.open_current(tmp_path / "index").all_records()}
    by_name = records["@0585155.78@4477324.14@17@T@40.44221@-79.99589@.jpg"]
    assert (by_name.location_source, by_name.utm_east, by_name.utm_zone) == ("filename", 585155.78, "17T")
    assert records["csv_wins@1@2@17@T@@@.jpg"].location_source == "csv"
    assert records["csv_wins@1@2@17@T@@@.jpg"].lat == 48.8584
    exif = records["exif.jpg"]
    assert exif.location_source == "exif" and exif.lat == pytest.approx(35.6593, abs=1e-4)
    assert records["nowhere.png"].lat is None and records["nowhere.png"].location_source is None
    again = build(refs, tmp_path / "index", tiny_ckpt)  # reused images keep their EXIF location
    assert again.reused == 4 and again.with_location == 3


def test_readers_keep_their_version_through_rebuilds_and_cleanup(refs, tmp_path, tiny_ckpt):
    index_dir = tmp_path / "index"
    build(refs, index_dir, tiny_ckpt)
    reader = IndexVersion.open_current(index_dir)
    old_ids = list(range(len(reader)))
    old_maps = reader.read_local(old_ids)
    shutil.rmtree(refs / "p2")
    build(refs, index_dir, tiny_ckpt, full=True, grace_seconds=3600)
    assert (index_dir / "versions" / "v000001").is_dir()  # within the grace period
    build(refs, index_dir, tiny_ckpt, full=True, grace_seconds=0)
    assert sorted(p.name for p in (index_dir / "versions").iterdir()) == ["v000003"]
    referenced = {s.name for s in IndexVersion.open_current(index_dir).manifest.segments}
    assert {p.name for p in (index_dir / SEGMENTS).iterdir()} == referenced
    # The first reader's files are gone from the directory, yet it still answers.
    assert len(reader) == 9 and reader.records([8])[0].path.startswith("p2/")
    np.testing.assert_array_equal(reader.read_local(old_ids), old_maps)


def test_a_stray_version_folder_does_not_fail_the_build(refs, tmp_path, tiny_ckpt):
    """A removal cut short can leave a version folder without its manifest: the next build still
    publishes, cleans it up, and keeps the segments of the published version."""
    index_dir = tmp_path / "index"
    build(refs, index_dir, tiny_ckpt)
    (index_dir / "versions" / "v000000").mkdir()
    (index_dir / "versions" / "v000000" / "global.faiss").write_bytes(b"half")
    report = build(refs, index_dir, tiny_ckpt, grace_seconds=3600)
    assert report.version == "v000002"
    assert not (index_dir / "versions" / "v000000").exists()
    assert len(IndexVersion.open_current(index_dir).read_local([0, 8])) == 2


def test_one_build_at_a_time(refs, tmp_path, tiny_ckpt):
    index_dir = tmp_path / "index"
    with BuildLock(index_dir):
        assert index_status(index_dir)["build_running"] is True
        with pytest.raises(BuildInProgress, match="another build is running"):
            build(refs, index_dir, tiny_ckpt)
    assert index_status(index_dir)["build_running"] is False


def test_killed_build_leaves_the_last_version_and_the_next_reuses_its_work(refs, tmp_path, tiny_ckpt):
    index_dir = tmp_path / "index"
    build(refs, index_dir, tiny_ckpt)
    noise_images(refs / "many", 80)
    cmd = [
        sys.executable,
        "-m",
        "app.cli",
        "index",
        "build",
        "--references",
        str(refs),
        "--index-dir",
        str(index_dir),
        "--checkpoint",
        str(tiny_ckpt),
        "--device",
        "cpu",
        "--batch-size",
        "1",
        "--segment-size",
        "1",
        "--decode-workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    segments = index_dir / SEGMENTS
    deadline = time.monotonic() + 120
    while len([p for p in segments.iterdir() if not p.name.startswith(".")]) < 6:
        assert proc.poll() is None, "the build finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    assert current_version_name(index_dir) == "v000001"
    survivor = IndexVersion.open_current(index_dir)
    assert len(survivor) == 9
    assert Localizer(survivor, _extractor(tiny_ckpt)).localize(next((refs / "p0" / "i0").iterdir())).matches

    resumed = build(refs, index_dir, tiny_ckpt)
    assert resumed.total == 89 and resumed.reused >= 9 + 4 and resumed.encoded <= 80 - 4
    assert not [p for p in segments.iterdir() if p.name.startswith(".tmp-")]
    assert index_status(index_dir, verify=True)["verification"]["ok"]


def _extractor(ckpt: Path):
    from model.extractor import FeatureExtractor

    return FeatureExtractor.from_checkpoint(str(ckpt), "cpu")


def test_localize_answers_in_the_api_shape(refs, tmp_path, tiny_ckpt):
    (refs / "locations.csv").write_text("path,lat,lon\np1/i0/Image059.jpg,-27.4772,153.0281\n")
    build(refs, tmp_path / "index", tiny_ckpt)
    localizer = Localizer.open(tmp_path / "index")
    result = localizer.localize(refs / "p1" / "i0" / "Image059.jpg", top_k=3, rerank_k=8).model_dump()
    assert set(result) == {
        "matches",
        "location",
        "index_version",
        "timings_ms",
        "partial",
        "missing_shards",
        "coverage",
        "status",
        "probability",
        "radius_m",
        "calibration",
    }
    assert (result["partial"], result["missing_shards"], result["coverage"]) == (False, [], 1.0)
    # one located reference: too few to calibrate, so no probability, and said so
    assert (result["status"], result["probability"], result["calibration"]) == ("located", None, None)
    assert set(result["timings_ms"]) == {"decode", "extract", "search", "rerank", "total"}
    top = result["matches"][0]
    assert set(top) == {
        "id",
        "name",
        "path",
        "rank",
        "global_score",
        "mnn_matches",
        "lat",
        "lon",
        "utm_east",
        "utm_north",
    }
    # itself, stored in int8: nearly every one of the 29 x 29 positions matches its stored copy
    assert (top["path"], top["rank"]) == ("p1/i0/Image059.jpg", 1) and top["mnn_matches"] > 0.98 * 29 * 29
    assert top["name"] == "Image059.jpg"  # no name recorded: the file's own name
    assert [m["rank"] for m in result["matches"]] == [1, 2, 3]
    confidence = round(top["mnn_matches"] / (29 * 29), 4)
    assert result["location"] == {
        "lat": -27.4772,
        "lon": 153.0281,
        "source_id": top["id"],
        "confidence": confidence,
    }
    assert result["index_version"] == "v000001"
    assert len(localizer.localize(refs / "p1" / "i0" / "Image059.jpg", top_k=5, rerank_k=2).matches) == 5


def test_stored_maps_feed_the_matcher_like_arrays(refs, tmp_path, tiny_ckpt):
    build(refs, tmp_path / "index", tiny_ckpt)
    version = IndexVersion.open_current(tmp_path / "index")
    ids = [4, 0, 7, 2]
    query = torch.from_numpy(version.read_local([1])[0])
    stored = mnn_scores(query, version.candidate_maps(ids), "float32")
    dense = mnn_scores(query, version.read_local(ids), "float32")
    assert stored.tolist() == dense.tolist()


def test_resident_maps_feed_the_matcher_like_the_store(refs, tmp_path, tiny_ckpt):
    """make_resident (what a GPU server does with an index that fits its memory), here on CPU."""
    build(refs, tmp_path / "index", tiny_ckpt)
    version = IndexVersion.open_current(tmp_path / "index")
    ids = [4, 0, 7, 2]
    query = torch.from_numpy(version.read_local([1])[0])
    stored = version.candidate_maps(ids)
    version.make_resident(torch.device("cpu"))
    resident = version.candidate_maps(ids)
    assert type(resident).__name__ == "ResidentCandidates" and len(resident) == 4
    assert version.stored_local_bytes() == version.resident.values.nbytes + version.resident.scales.nbytes
    np.testing.assert_allclose(resident.load([3, 0]).numpy(), stored.load([3, 0]).numpy(), atol=1e-6)
    assert mnn_scores(query, resident, "float32").tolist() == mnn_scores(query, stored, "float32").tolist()
    version.close()
    assert version.resident is None


def test_a_shards_resident_maps_are_its_own_and_count_like_the_store(refs, tmp_path, tiny_ckpt):
    """A Ray shard replica on a GPU holds only its references' maps (search.hold_maps_resident with its
    ids), here on CPU: the same counts as reading them from the store; another shard's id is refused."""
    from index_builder.search import hold_maps_resident

    build(refs, tmp_path / "index", tiny_ckpt)
    version = IndexVersion.open_current(tmp_path / "index")
    own = np.array([6, 1, 3], dtype=np.int64)  # a shard's ids, in its own order
    query = torch.from_numpy(version.read_local([0])[0])
    stored = mnn_scores(query, version.candidate_maps([3, 6, 1]), "float32")
    # the serving policy: never on a CPU, never beyond the budget
    assert not hold_maps_resident(version, torch.device("cpu"), 2**40, own)
    assert version.resident is None
    version.make_resident(torch.device("cpu"), own)
    assert version.resident.values.shape[0] == 3
    assert version.stored_local_bytes(3) == version.resident.values.nbytes + version.resident.scales.nbytes
    resident = version.candidate_maps([3, 6, 1])
    assert type(resident).__name__ == "ResidentCandidates"
    assert mnn_scores(query, resident, "float32").tolist() == stored.tolist()
    with pytest.raises(KeyError):
        version.candidate_maps([2])
    version.close()


def test_a_reader_of_some_images_reads_only_their_part_of_the_id_map(refs, tmp_path, tiny_ckpt):
    """IndexVersion only_ids (a Ray shard replica: its own references; the ingress and the encoder:
    none): only those rows of the id map at opening, the others looked up when first read; the same
    maps and records as a reader of the whole map."""
    build(refs, tmp_path / "index", tiny_ckpt)
    whole = IndexVersion.open_current(tmp_path / "index")
    part = IndexVersion(whole.index_dir, whole.name, load_global=False, only_ids=np.array([5, 2]))
    assert len(part) == len(whole) and part.records([0])[0] == whole.records([0])[0]
    assert sorted(np.nonzero(part.id_segment >= 0)[0].tolist()) == [2, 5]
    np.testing.assert_array_equal(part.read_local([2, 5]), whole.read_local([2, 5]))
    none = IndexVersion(whole.index_dir, whole.name, load_global=False, only_ids=np.zeros(0, np.int64))
    assert len(none) == len(whole) and none.segment_names == []
    everything = list(range(len(whole)))
    for reader in (part, none):  # looked up on first read, files opened then
        np.testing.assert_array_equal(reader.read_local(everything[::-1]), whole.read_local(everything[::-1]))
        assert sorted(reader.segment_names) == sorted(whole.segment_names)
    for version in (whole, part, none):
        version.close()


def test_localize_refuses_another_model(refs, tmp_path, tiny_ckpt):
    build(refs, tmp_path / "index", tiny_ckpt)
    other = tiny_checkpoint(tmp_path / "other", seed=13)
    with pytest.raises(CheckpointMismatch, match="rebuild the index"):
        Localizer.open(tmp_path / "index", checkpoint=str(other))


def test_empty_reference_folder(tmp_path, tiny_ckpt, shared_data):
    (tmp_path / "refs").mkdir()
    report = build(tmp_path / "refs", tmp_path / "index", tiny_ckpt)
    assert (report.total, report.version) == (0, "v000001")
    result = Localizer.open(tmp_path / "index").localize(shared_data / "tokyo_pair" / "tokyo_db.png")
    assert result.matches == [] and result.location is None
    with pytest.raises(IndexNotFound, match="no published index"):
        IndexVersion.open_current(tmp_path / "nothing")


def test_verify_detects_a_damaged_segment(refs, tmp_path, tiny_ckpt):
    build(refs, tmp_path / "index", tiny_ckpt)
    assert index_status(tmp_path / "index", verify=True)["verification"]["ok"]
    segment = next((tmp_path / "index" / SEGMENTS).iterdir())
    data = bytearray((segment / "local.npy").read_bytes())
    data[-1] ^= 0xFF
    (segment / "local.npy").write_bytes(bytes(data))
    verification = index_status(tmp_path / "index", verify=True)["verification"]
    assert not verification["ok"] and "checksum mismatch" in verification["problems"][0]


def _rewrite_in_the_layout_before_segments(index_dir: Path) -> None:
    """Turn a freshly built index into what releases before the rename wrote: feature segments named
    `s-<id>` under `shards/`, the manifest's `shards` list (format 1), the metadata's `shard` column."""
    renames = {}
    (index_dir / "shards").mkdir()
    for folder in (index_dir / SEGMENTS).iterdir():
        renames[folder.name] = "s-" + folder.name[2:]
        folder.rename(index_dir / "shards" / renames[folder.name])
    (index_dir / SEGMENTS).rmdir()
    version_dir = index_dir / "versions" / current_version_name(index_dir)
    db = sqlite3.connect(version_dir / "meta.sqlite")
    db.execute("ALTER TABLE images RENAME COLUMN segment TO shard")
    for new, old in renames.items():
        db.execute("UPDATE images SET shard = ? WHERE shard = ?", (old, new))
    db.commit()
    db.close()
    manifest = json.loads((version_dir / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest["shards"] = [entry | {"name": renames[entry["name"]]} for entry in manifest.pop("segments")]
    manifest["files"]["meta.sqlite"] = sha256_file(version_dir / "meta.sqlite")
    (version_dir / "manifest.json").write_text(json.dumps(manifest))


def test_an_index_written_before_segments_opens_and_is_reused(refs, tmp_path, tiny_ckpt):
    index_dir = tmp_path / "index"
    build(refs, index_dir, tiny_ckpt)
    fresh = IndexVersion.open_current(index_dir)
    maps, records = fresh.read_local(range(9)), fresh.all_records()
    fresh.close()
    _rewrite_in_the_layout_before_segments(index_dir)

    old = IndexVersion.open_current(index_dir)
    assert all(r.segment.startswith("s-") for r in old.all_records())
    assert [r.path for r in old.all_records()] == [r.path for r in records]
    np.testing.assert_array_equal(old.read_local(range(9)), maps)
    assert index_status(index_dir, verify=True)["verification"]["ok"]
    query = next((refs / "p0" / "i0").iterdir())
    assert Localizer(old, _extractor(tiny_ckpt)).localize(query).matches[0].path == "p0/i0/Image001.jpg"

    noise_images(refs / "new", 1)
    report = build(refs, index_dir, tiny_ckpt, grace_seconds=0)
    assert (report.encoded, report.reused) == (1, 9)  # the old segments' features, not encoded again
    assert {p.parent.name for p in index_dir.glob("*/?-*")} == {"shards", SEGMENTS}
    assert index_status(index_dir, verify=True)["verification"]["ok"]
    build(refs, index_dir, tiny_ckpt, full=True, grace_seconds=0)
    assert not list((index_dir / "shards").iterdir())  # unused once nothing refers to them


def test_int8_local_codec_error_bound():
    rng = np.random.default_rng(0)
    local = rng.standard_normal((3, 5, 5, 64)).astype(np.float32)
    local /= np.linalg.norm(local, axis=-1, keepdims=True)
    local[0, 0, 0] = 0.0  # a zero position survives
    stored = encode_local(local, "int8")
    assert stored["local"].dtype == np.int8 and stored["scale"].dtype == np.float16
    decoded = decode_local(stored["local"], stored["scale"])
    step = stored["scale"].astype(np.float32)[..., None] / 254  # half a quantisation step
    # rounding moves each component by at most `step`; renormalising then rescales by at most |e|_2
    bound = step + np.abs(local) * step * np.sqrt(64)
    assert np.all(np.abs(decoded - local) <= bound + 1e-6)
    np.testing.assert_allclose(np.linalg.norm(decoded[1:], axis=-1), 1.0, atol=1e-6)
    assert np.all(decoded[0, 0, 0] == 0)
    half = encode_local(local, "float16")
    np.testing.assert_allclose(decode_local(half["local"], None), local, atol=1e-3)
    # the torch decode that accelerators run (re-ranking on the model's device) agrees with numpy's
    for arrays in (stored, half):
        scale = arrays.get("scale")
        on_torch = decode_local_torch(
            torch.from_numpy(arrays["local"]), None if scale is None else torch.from_numpy(scale)
        )
        np.testing.assert_allclose(on_torch.numpy(), decode_local(arrays["local"], scale), atol=1e-6)
        assert np.all(on_torch.numpy()[0, 0, 0] == 0)


def test_approximate_global_indexes():
    rng = np.random.default_rng(1)
    data = rng.standard_normal((2000, 64)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    queries = data[:50] + 0.05 * rng.standard_normal((50, 64)).astype(np.float32)
    exact = search(build_global_index(data, GlobalIndexConfig()), queries, 1)[1]
    for kind in ("hnsw", "ivfpq"):
        found = search(build_global_index(data, GlobalIndexConfig(kind=kind)), queries, 10)[1]
        assert np.mean([exact[i, 0] in found[i] for i in range(50)]) >= 0.9
    small = build_global_index(data[:100], GlobalIndexConfig(kind="ivfpq"))
    assert small.ntotal == 100  # too few to train IVF-PQ: exact search instead


def test_cli_build_status_and_localize(refs, tmp_path, tiny_ckpt, capsys):
    from app.cli import main

    index_dir = tmp_path / "index"
    args = ["--references", str(refs), "--index-dir", str(index_dir), "--checkpoint", str(tiny_ckpt)]
    assert main(["index", "build", *args, "--device", "cpu"]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert set(json.loads(last_line)) == {
        "version",
        "total",
        "encoded",
        "reused",
        "removed",
        "skipped",
        "seconds",
    }
    assert main(["index", "status", "--index-dir", str(index_dir)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["current_version"], status["num_images"], status["build_running"]) == ("v000001", 9, False)
    query = str(refs / "p0" / "i1" / "Image002.jpg")
    assert main(["localize", query, "--index-dir", str(index_dir), "--top-k", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["matches"][0]["path"] == "p0/i1/Image002.jpg" and len(result["matches"]) == 2
    assert main(["localize", query, "--index-dir", str(tmp_path / "none")]) == 2
    assert "no published index" in capsys.readouterr().err


def test_the_model_dtype_is_part_of_the_index_identity(refs, tmp_path, tiny_ckpt):
    """A bfloat16 forward gives other features: the index records it and re-encodes everything."""
    build(refs, tmp_path / "index", tiny_ckpt)
    report = build(refs, tmp_path / "index", tiny_ckpt, model_dtype="bfloat16")
    assert (report.encoded, report.reused) == (9, 0)
    identity = IndexVersion.open_current(tmp_path / "index").identity
    assert identity.model_dtype == "bfloat16"
    older = {k: v for k, v in identity.to_dict().items() if k != "model_dtype"}  # a manifest from before
    assert EncodingIdentity.from_dict(older).model_dtype == "float32"
