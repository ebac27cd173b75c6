"""The storage fault matrix, on a 3 MiB disk (a real tmpfs as root, a fault-injecting file layer
otherwise: tests/faulty_disk.py; the test prints which). Each fault has one expected outcome: the
service keeps answering from the last good version, the fault is reported, nothing acknowledged is
lost, and the disk space comes back. The docs list the matrix with these outcomes."""

from __future__ import annotations

import asyncio
import errno
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from app.cli import main as cli
from index_builder import builder
from index_builder.builder import BuildConfig, build_index
from index_builder.encoding import LocalEncoder
from index_builder.rollback import rollback
from index_builder.store import SEGMENTS, IndexStoreError, current_version_name, shard_segments, versions
from index_builder.store.space import DiskFull
from model.options import ModelOptions
from tests.faulty_disk import small_disk
from tests.helpers import noise_images
from tests.service_helpers import files, running, settings_for, wait_idle

pytestmark = pytest.mark.anyio
KIB = 1024
DISK_FULL = r"rebuild failed: disk full: [\d.]+ MiB free, about [\d.]+ MiB needed"


@pytest.fixture
def disk(tmp_path, monkeypatch):
    with small_disk(tmp_path / "disk", monkeypatch) as d:
        yield d


def references(root: Path, shared_data: Path) -> Path:
    refs = root / "refs"
    for place in ("p0", "p1", "p2"):
        shutil.copytree(shared_data / "matching_triplets" / place, refs / place)
    return refs


def build(refs: Path, index: Path, ckpt: Path, **options):
    config = BuildConfig(
        references=refs, index_dir=index, **options, model=ModelOptions(checkpoint=str(ckpt), device="cpu")
    )
    return build_index(config)


@pytest.fixture
def served(disk, shared_data, tiny_ckpt) -> tuple[Path, Path]:
    """Three places on the small disk, indexed (v000001)."""
    refs = references(disk.root, shared_data)
    build(refs, disk.root / "index", tiny_ckpt)
    return refs, disk.root / "index"


def quick(refs: Path, index: Path, ckpt: Path, **overrides):
    return settings_for(refs, index, ckpt, verify_interval_s=0.2, **overrides)


def query(refs: Path) -> bytes:
    return (refs / "p1" / "i0" / "Image059.jpg").read_bytes()


async def metric(client, name: str) -> float:
    text = (await client.get("/metrics")).text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def fill_at(stage: str, disk, monkeypatch) -> None:
    """The disk fills as the build reaches `stage`: encoding begins; a segment's second array is
    being written (a partial file); the version's metadata is written after its FAISS index."""
    if stage == "encode":
        original = builder.encode

        def encode(*args, **kwargs):
            disk.fill()
            return original(*args, **kwargs)

        monkeypatch.setattr(builder, "encode", encode)
    elif stage == "write":
        save, calls = np.save, []

        def partial_save(path, array, *args, **kwargs):
            calls.append(path)
            if len(calls) == 2:
                disk.fill(leave=4 * KIB)  # part of this array fits, the rest does not
            return save(path, array, *args, **kwargs)

        monkeypatch.setattr(np, "save", partial_save)
    else:
        write_index = versions.write_global_index

        def then_fill(*args, **kwargs):
            write_index(*args, **kwargs)
            disk.fill()

        monkeypatch.setattr(versions, "write_global_index", then_fill)


@pytest.mark.parametrize("stage", ["encode", "write", "publish"])
async def test_disk_full_at_each_build_stage(stage, disk, served, tiny_ckpt, monkeypatch):
    refs, index = served
    noise_images(refs / "new", 3)
    async with running(quick(refs, index, tiny_ckpt)) as (_, client):
        used_before = disk.used_bytes()
        fill_at(stage, disk, monkeypatch)
        assert (await client.post("/index/rebuild")).status_code == 202
        status = await wait_idle(client)
        print(f"{disk.kind} {stage}: {status['last_error']}; used {used_before} -> {disk.used_bytes()}")
        assert status["state"] == "failed" and re.fullmatch(DISK_FULL, status["last_error"])
        assert status["index_version"] == "v000001"
        assert abs(disk.used_bytes() - used_before) <= 64 * KIB  # the failed build's files are gone
        assert not [p for p in (index / SEGMENTS).iterdir() if p.name.startswith(".tmp-")]
        assert (await client.post("/localize", files=files(query(refs)))).status_code == 200
        disk.fill()  # what the build gave back is taken again: uploads while the disk is full
        upload = await client.post("/index/images", files=files(query(refs), "full.jpg"))
        assert upload.status_code == 507 and "disk full" in upload.json()["error"]["message"]
        assert not (refs / "uploads").exists()  # nothing half-written
        assert await metric(client, 'selavpr_disk_full_total{during="rebuild"}') == 1
        assert await metric(client, 'selavpr_disk_full_total{during="upload"}') == 1

        disk.release()
        monkeypatch.undo()  # the stage hook (and an injected layer: the disk has room again either way)
        assert (await client.post("/index/rebuild")).status_code == 202
        status = await wait_idle(client)
        assert status["state"] == "idle" and status["index_version"] == "v000002"
        assert status["num_images"] == 12


async def test_a_build_that_cannot_fit_is_refused_before_it_encodes(disk, served, tiny_ckpt, monkeypatch):
    refs, index = served
    noise_images(refs / "new", 40)
    encoded = []
    encode = LocalEncoder.encode
    monkeypatch.setattr(LocalEncoder, "encode", lambda self, b: encoded.append(1) or encode(self, b))
    used_before = disk.used_bytes()
    disk.fill(leave=200 * KIB)  # less than 40 images' features and the margin
    with pytest.raises(IndexStoreError, match=r"^disk full: [\d.]+ MiB free, about [\d.]+ MiB needed$"):
        build(refs, index, tiny_ckpt)
    assert encoded == [] and abs(disk.used_bytes() - used_before) <= 64 * KIB
    assert current_version_name(index) == "v000001"


async def test_disk_full_while_an_upload_is_written_leaves_nothing(disk, served, tiny_ckpt, monkeypatch):
    """The room check passes, then the disk fills (another writer): both images or none are kept."""
    from app.routers import index as index_router

    refs, index = served
    (refs / "uploads").mkdir()
    csv = refs / "uploads" / "locations.csv"
    csv.write_text("path,lat,lon,name\n")
    async with running(quick(refs, index, tiny_ckpt)) as (_, client):
        monkeypatch.setattr(index_router, "check_room", lambda path, needed: None)
        disk.fill(leave=len(query(refs)) + 8 * KIB)  # the first image fits, the second does not
        two = [("image", ("a.jpg", query(refs))), ("image", ("b.jpg", query(refs)))]
        response = await client.post("/index/images", files=two, data={"lat": ["1", "2"], "lon": ["3", "4"]})
        assert response.status_code == 507, response.text
        assert [p for p in (refs / "uploads").rglob("*") if p.is_file()] == [csv]
        assert csv.read_text() == "path,lat,lon,name\n"
        disk.release()
        response = await client.post("/index/images", files=two, data={"lat": ["1", "2"], "lon": ["3", "4"]})
        assert response.status_code == 201 and len(csv.read_text().splitlines()) == 3


async def test_read_only_index_folder(disk, served, tiny_ckpt):
    refs, index = served
    noise_images(refs / "new", 2)
    async with running(quick(refs, index, tiny_ckpt)) as (_, client):
        disk.read_only()
        assert (await client.post("/index/rebuild")).status_code == 202
        status = await wait_idle(client)
        assert status["state"] == "failed"
        assert status["last_error"] == "rebuild failed: the index folder is on a read-only file system"
        assert (await client.post("/localize", files=files(query(refs)))).status_code == 200
        upload = await client.post("/index/images", files=files(query(refs)))
        assert upload.status_code == 503 and "not writable" in upload.json()["error"]["message"]
        await until(client, lambda s: s["verification"] is not None)
        assert (await client.get("/index/status")).json()["verification"]["ok"]  # reading still works
        disk.read_only(False)
        assert (await client.post("/index/rebuild")).status_code == 202
        assert (await wait_idle(client))["index_version"] == "v000002"


async def until(client, check, timeout: float = 30) -> dict:
    for _ in range(int(timeout / 0.1)):
        status = (await client.get("/index/status")).json()
        if check(status):
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"not seen within {timeout} s: {status}")


def damage(index: Path, segment: str, how: str) -> None:
    local = index / SEGMENTS / segment / "local.npy"
    if how == "flip":
        data = bytearray(local.read_bytes())
        data[len(data) // 2] ^= 0x10
        local.write_bytes(bytes(data))
    elif how == "truncate":
        with open(local, "r+b") as f:
            f.truncate(local.stat().st_size // 2)
    else:
        local.unlink()


@pytest.fixture
def two_versions(tmp_path, shared_data, tiny_ckpt) -> tuple[Path, Path, str]:
    """v000001 (three places), v000002 (three more images in a segment of its own): that segment's name."""
    refs = references(tmp_path, shared_data)
    index = tmp_path / "index"
    build(refs, index, tiny_ckpt)
    first = set((index / SEGMENTS).iterdir())
    noise_images(refs / "new", 3)
    build(refs, index, tiny_ckpt)
    (added,) = set((index / SEGMENTS).iterdir()) - first
    return refs, index, added.name


async def test_a_flipped_bit_is_reported_then_rolled_back_and_rebuilt(two_versions, tiny_ckpt, capsys):
    refs, index, added = two_versions
    async with running(quick(refs, index, tiny_ckpt)) as (_, client):
        await until(client, lambda s: s["verification"] is not None)
        assert await metric(client, "selavpr_index_intact") == 1
        damage(index, added, "flip")
        status = await until(client, lambda s: not s["verification"]["ok"])
        assert status["verification"]["problems"] == [f"checksum mismatch segments/{added}/local.npy"]
        ready = (await client.get("/readyz")).json()
        assert ready["status"] == "degraded" and ready["problems"] == status["verification"]["problems"]
        assert await metric(client, "selavpr_index_intact") == 0
        assert (await client.post("/localize", files=files(query(refs)))).status_code == 200
        assert cli(["index", "status", "--index-dir", str(index), "--verify"]) == 1
        capsys.readouterr()

        back = await client.post("/index/rollback")
        assert back.json() == {"previous": "v000002", "current": "v000001", "rejected": []}
        assert (await client.get("/readyz")).json() == {"status": "ready", "index_version": "v000001"}
        assert cli(["index", "status", "--index-dir", str(index), "--verify"]) == 0
        assert (await client.post("/index/rebuild")).status_code == 202
        status = await wait_idle(client)
        assert status["index_version"] == "v000003" and status["last_report"]["encoded"] == 3  # not reused
        assert not (index / SEGMENTS / added).exists()
        status = await until(client, lambda s: (s["verification"] or {}).get("version") == "v000003")
        assert status["verification"]["ok"]


@pytest.mark.parametrize("how", ["truncate", "missing"])
async def test_a_damaged_served_file_rolls_back_on_its_own(how, two_versions, tiny_ckpt):
    refs, index, added = two_versions
    async with running(quick(refs, index, tiny_ckpt, auto_rollback=True)) as (_, client):
        damage(index, added, how)
        await until(client, lambda s: s["index_version"] == "v000001")
        assert (await client.get("/readyz")).json()["status"] == "ready"
        response = await client.post("/localize", files=files(query(refs)))
        assert response.status_code == 200 and response.json()["index_version"] == "v000001"
        assert await metric(client, "selavpr_index_rollbacks_total") == 1
        status = await until(client, lambda s: (s["verification"] or {}).get("version") == "v000001")
        assert status["verification"]["ok"]


def test_no_rollback_to_a_version_that_shares_the_damage(two_versions, capsys):
    _, index, added = two_versions
    shared = next(p.name for p in (index / SEGMENTS).iterdir() if p.name != added)
    damage(index, shared, "flip")
    with pytest.raises(IndexStoreError, match="no intact earlier version.*v000001: checksum mismatch"):
        rollback(index)
    assert current_version_name(index) == "v000002"
    assert cli(["index", "status", "--index-dir", str(index), "--verify"]) == 1
    assert cli(["index", "status", "--index-dir", str(index / "none"), "--verify"]) == 3
    assert cli(["index", "rollback", "--index-dir", str(index)]) == 2
    assert "no intact earlier version" in capsys.readouterr().err


def test_a_failed_build_removes_what_it_wrote_whatever_the_cause(
    tmp_path, shared_data, tiny_ckpt, monkeypatch
):
    refs = references(tmp_path, shared_data)
    index = tmp_path / "index"
    build(refs, index, tiny_ckpt)
    before = sorted(p.name for p in (index / SEGMENTS).iterdir())
    noise_images(refs / "new", 6)
    encode, batches = LocalEncoder.encode, []

    def failing(self, planned):
        for encoded in encode(self, planned):
            batches.append(encoded)
            if len(batches) == 4:
                raise RuntimeError("decoder crashed")
            yield encoded

    monkeypatch.setattr(LocalEncoder, "encode", failing)
    with pytest.raises(RuntimeError, match="decoder crashed"):
        build(refs, index, tiny_ckpt, batch_size=1, segment_size=1)
    assert sorted(p.name for p in (index / SEGMENTS).iterdir()) == before
    assert [p.name for p in (index / "versions").iterdir()] == ["v000001"]


def test_a_sharded_build_failing_while_copying_into_shard_segments_removes_its_copies(
    tmp_path, shared_data, tiny_ckpt, monkeypatch
):
    """Going to 2 shards copies stored maps into segments of their shard; a full disk part-way through
    fails the build as DiskFull, removes the copies already written, and leaves v000001 published."""
    refs = references(tmp_path, shared_data)
    index = tmp_path / "index"
    build(refs, index, tiny_ckpt)
    before = sorted(p.name for p in (index / SEGMENTS).iterdir())
    copy, copied = shard_segments.copy_rows, []

    def filling(*args):
        if copied:
            raise OSError(errno.ENOSPC, "No space left on device")
        copied.append(copy(*args))
        return copied[-1]

    monkeypatch.setattr(shard_segments, "copy_rows", filling)
    with pytest.raises(DiskFull):
        build(refs, index, tiny_ckpt, shards=2, segment_size=1)
    assert len(copied) == 1 and sorted(p.name for p in (index / SEGMENTS).iterdir()) == before
    assert [p.name for p in (index / "versions").iterdir()] == ["v000001"]
    assert current_version_name(index) == "v000001"
    monkeypatch.undo()
    report = build(refs, index, tiny_ckpt, shards=2)
    assert report.encoded == 0 and current_version_name(index) == report.version
