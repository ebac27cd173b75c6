"""Storage faults on a real `selavpr serve` process: an answered upload survives `kill -9`, a flipped
bit is reported by the running server and by `selavpr index status --verify`, and (as root, on a real
16 MiB tmpfs) a disk that fills during a rebuild is reported, given back, and recovered from."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.faulty_disk import TmpfsDisk, can_mount
from tests.helpers import noise_images, tiny_checkpoint
from tests.servers import serve_args, serve_process

KIB = 1024
DISK_FULL = r"rebuild failed: disk full: [\d.]+ MiB free, about [\d.]+ MiB needed"


def wait_for(base: str, check, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{base}/index/status", timeout=5).json()
        if check(status):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.2)


def rebuild(base: str) -> dict:
    assert httpx.post(f"{base}/index/rebuild", timeout=5).status_code == 202
    return wait_for(base, lambda s: s["state"] != "running" and not s["queued"], timeout=120)


def verify_exit_code(index: Path) -> int:
    cmd = [sys.executable, "-m", "app.cli", "index", "status", "--index-dir", str(index), "--verify"]
    return subprocess.run(cmd, capture_output=True, timeout=120).returncode


def test_an_answered_upload_survives_kill_9_and_a_flipped_bit_is_reported(tmp_path, shared_data):
    refs, index = tmp_path / "refs", tmp_path / "index"
    shutil.copytree(shared_data / "matching_triplets" / "p0", refs / "p0")
    ckpt = tiny_checkpoint(tmp_path / "tiny")
    photo = shared_data / "tokyo_pair" / sorted(os.listdir(shared_data / "tokyo_pair"))[0]
    args = serve_args(refs, index, ckpt)
    with serve_process(args) as (base, proc):
        upload = httpx.post(
            f"{base}/index/images", files={"image": ("tokyo.jpg", photo.read_bytes())}, timeout=30
        )
        assert upload.status_code == 201
        proc.send_signal(signal.SIGKILL)  # right after the answer
        proc.wait()
    (stored,) = upload.json()["stored"]
    assert (refs / stored["path"]).read_bytes() == photo.read_bytes()

    env = {"SELAVPR_VERIFY_INTERVAL_S": "1"}  # the default (30 s) reports within a minute too
    with serve_process(args, env) as (base, _):
        status = rebuild(base)
        assert status["state"] == "idle" and status["num_images"] == 3 + 1
        listed = httpx.get(f"{base}/index/references", params={"limit": 100}, timeout=5).json()
        assert stored["path"] in [item["path"] for item in listed["items"]]
        found = httpx.post(f"{base}/localize", files={"image": ("q.jpg", photo.read_bytes())}, timeout=30)
        assert found.json()["matches"][0]["path"] == stored["path"]

        wait_for(base, lambda s: (s["verification"] or {}).get("version") == status["index_version"])
        assert verify_exit_code(index) == 0
        segment = next(p for p in (index / "segments").iterdir() if not p.name.startswith("."))
        data = bytearray((segment / "local.npy").read_bytes())
        data[-7] ^= 0x01
        (segment / "local.npy").write_bytes(bytes(data))
        damaged = wait_for(base, lambda s: not s["verification"]["ok"], timeout=60)
        assert damaged["verification"]["problems"] == [f"checksum mismatch segments/{segment.name}/local.npy"]
        assert httpx.get(f"{base}/readyz", timeout=5).json()["status"] == "degraded"
        assert verify_exit_code(index) == 1


@pytest.fixture
def tmpfs(tmp_path):
    if not can_mount():
        pytest.skip("needs root to mount a tmpfs (the in-process fault matrix covers this without)")
    disk = TmpfsDisk(tmp_path / "disk", 16 * 2**20)  # room for 100 images' tiny-model features
    try:
        yield disk
    finally:
        disk.release()
        disk.close()


def test_a_disk_that_fills_during_a_rebuild(tmpfs, tmp_path, shared_data):
    refs, index = tmpfs.root / "refs", tmpfs.root / "index"
    shutil.copytree(shared_data / "matching_triplets" / "p0", refs / "p0")
    args = serve_args(refs, index, tiny_checkpoint(tmp_path / "tiny"))
    with serve_process(args) as (base, _):
        noise_images(refs / "new", 100, size=(40, 30))
        used_before = tmpfs.used_bytes()
        assert httpx.post(f"{base}/index/rebuild", timeout=5).status_code == 202
        # another writer fills the disk while the images are encoded (the segment is written after)
        wait_for(base, lambda s: (s["progress"] or {}).get("phase") == "encoding", timeout=60)
        tmpfs.fill()
        status = wait_for(base, lambda s: s["state"] != "running", timeout=120)
        assert status["state"] == "failed", status
        assert re.fullmatch(DISK_FULL, status["last_error"]), status["last_error"]
        assert abs(tmpfs.used_bytes() - used_before) <= 64 * KIB
        photo = next((refs / "p0" / "i0").iterdir()).read_bytes()
        tmpfs.fill()  # what the build gave back is taken again
        upload = httpx.post(f"{base}/index/images", files={"image": ("x.jpg", photo)}, timeout=30)
        assert upload.status_code == 507 and "disk full" in upload.json()["error"]["message"]
        assert (
            httpx.post(f"{base}/localize", files={"image": ("q.jpg", photo)}, timeout=30).status_code == 200
        )
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        assert 'selavpr_disk_full_total{during="rebuild"} 1.0' in metrics
        tmpfs.release()
        status = rebuild(base)
        assert status["state"] == "idle" and status["num_images"] == 3 + 100
