"""Named checkpoints: the registry, downloads against a loopback host (never the internet), the cache."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch

from app.cli import main
from model.errors import CheckpointError, DownloadError
from model.weights.formats import CheckpointFormat
from model.weights.gdrive import confirmation_url
from model.weights.loading import load_model
from model.weights.named import (
    RECORD_FILE,
    SHA256_FROM_FIRST_DOWNLOAD,
    SHA256_FROM_REGISTRY,
    entry_dir,
    fetch,
    find_cached,
    part_path,
    weights_root,
)
from model.weights.registry import ENTRIES, REGISTRY, get_entry
from tests.fake_host import FakeHost, closed_port_url
from tests.helpers import authors_checkpoint, dinov2_checkpoint, tiny_model

OFFLINE_MESSAGE = (
    "cannot reach 127.0.0.1 to fetch selavpr-msls; download it elsewhere and pass the file, or set the mirror"
)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SELAVPR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SELAVPR_MIRROR_URL", raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # a CI proxy must not see loopback requests
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def authors_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "SelaVPR_msls.pth"
    return authors_checkpoint(path, tiny_model(seed=3)).read_bytes()


@pytest.fixture(scope="module")
def dinov2_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "dinov2_vits14_pretrain.pth"
    return dinov2_checkpoint(path, tiny_model(adapters=False, seed=4)).read_bytes()


@pytest.fixture
def host():
    served = FakeHost().start()
    yield served
    served.stop()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_files(entry_name: str) -> list[str]:
    root = weights_root() / entry_name
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# --- the registry -------------------------------------------------------------------------------------


def test_registry_names_sources_and_licences():
    assert len(ENTRIES) == len(REGISTRY) == 11
    msls = REGISTRY["selavpr-msls"]
    assert msls.drive_file_id == "1vy05l0JTEgr6n8iSoz_P_yjWfEzFPAkV"
    assert msls.url == "https://drive.google.com/uc?export=download&id=1vy05l0JTEgr6n8iSoz_P_yjWfEzFPAkV"
    assert REGISTRY["selavpr-pitts30k"].drive_file_id == "1LKTZZRHfMH3dY3UPagCt2TIlMN5LguGO"
    assert REGISTRY["selavpr-reg4-msls"].drive_file_id == "16Qkr6MGe3k0kYtFfw3YLQXZFn4c9YvJk"
    assert msls.format is CheckpointFormat.SELAVPR_AUTHORS and msls.licence.startswith("MIT")
    assert (
        REGISTRY["dinov2-vitl14"].url
        == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
    )
    assert (
        REGISTRY["dinov2-vitg14-reg4"].url
        == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth"
    )
    for entry in ENTRIES:
        assert entry.sha256 is None and entry.size_bytes is None  # unknown, never guessed
        if entry.name.startswith("dinov2"):
            assert entry.licence.startswith("Apache-2.0") and entry.format is CheckpointFormat.DINOV2
    assert msls.source_url("https://models.example.com/selavpr/") == (
        "https://models.example.com/selavpr/SelaVPR_msls.pth"
    )
    with pytest.raises(CheckpointError, match="known names: dinov2-vitb14"):
        get_entry("selavpr-tokyo")


# --- fetching -----------------------------------------------------------------------------------------


def test_mirror_fetch_shows_progress_verifies_caches_and_loads_by_name(
    host, authors_bytes, monkeypatch, capsys
):
    host.files["/SelaVPR_msls.pth"] = authors_bytes
    monkeypatch.setenv("SELAVPR_MIRROR_URL", host.url + "/")

    loaded = load_model("selavpr-msls")

    progress = capsys.readouterr().err
    assert "selavpr-msls" in progress and "100%" in progress
    assert loaded.info.spec == "selavpr-msls" and loaded.info.format is CheckpointFormat.SELAVPR_AUTHORS
    assert loaded.info.trained_local_head and loaded.info.trained_adapters
    cached = find_cached(REGISTRY["selavpr-msls"])
    assert cached.path == entry_dir(REGISTRY["selavpr-msls"]) / "SelaVPR_msls.pth"
    assert cached.path.read_bytes() == authors_bytes
    record = cached.record
    assert record.sha256 == sha256(authors_bytes) and record.sha256_source == SHA256_FROM_FIRST_DOWNLOAD
    assert record.size_bytes == len(authors_bytes) and record.source == f"{host.url}/SelaVPR_msls.pth"
    assert record.fingerprint == loaded.info.fingerprint
    assert cache_files("selavpr-msls") == sorted([RECORD_FILE, "SelaVPR_msls.pth"])

    again = load_model("selavpr-msls")  # from the cache: verified, not downloaded again
    assert again.info.fingerprint == loaded.info.fingerprint
    assert len(host.file_requests("/SelaVPR_msls.pth")) == 1


def test_dinov2_layout_with_a_registry_hash(host, dinov2_bytes, monkeypatch):
    entry = replace(REGISTRY["dinov2-vits14"], url=f"{host.url}/dl/x.pth", sha256=sha256(dinov2_bytes))
    entry = replace(entry, size_bytes=len(dinov2_bytes))
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    host.files["/dl/x.pth"] = dinov2_bytes

    cached = fetch(entry, progress=False)

    assert cached.record.sha256_source == SHA256_FROM_REGISTRY
    assert load_model("dinov2-vits14").info.format is CheckpointFormat.DINOV2


def test_a_cut_connection_is_resumed_with_a_range_request(host, authors_bytes, monkeypatch):
    monkeypatch.setattr("model.weights.download.time.sleep", lambda s: None)
    host.files["/SelaVPR_msls.pth"] = authors_bytes
    host.cut_once.add("/SelaVPR_msls.pth")

    cached = fetch(REGISTRY["selavpr-msls"], mirror=host.url, progress=False)

    requests = host.file_requests("/SelaVPR_msls.pth")
    half = len(authors_bytes) // 2
    assert [r.range for r in requests] == [None, f"bytes={half}-"]
    assert requests[1].if_range is not None  # the ETag: a file changed upstream would restart, not splice
    assert cached.path.read_bytes() == authors_bytes
    assert not part_path(REGISTRY["selavpr-msls"]).exists()


def test_a_part_left_by_an_earlier_run_is_resumed(host, authors_bytes, monkeypatch):
    entry = REGISTRY["selavpr-msls"]
    host.files["/SelaVPR_msls.pth"] = authors_bytes
    host.cut_once.add("/SelaVPR_msls.pth")

    with pytest.raises(DownloadError, match="is kept: run the same command again to resume"):
        fetch(entry, mirror=host.url, progress=False, retries=0)
    half = len(authors_bytes) // 2
    assert part_path(entry).stat().st_size == half and find_cached(entry) is None

    assert main(["weights", "fetch", "selavpr-msls", "--mirror", host.url, "--no-progress"]) == 0
    assert host.file_requests("/SelaVPR_msls.pth")[-1].range == f"bytes={half}-"
    assert find_cached(entry).path.read_bytes() == authors_bytes


def _leave_part(entry, url: str, content: bytes, validator: str) -> None:
    part = part_path(entry)
    part.parent.mkdir(parents=True)
    part.write_bytes(content)
    part.with_name(part.name + ".json").write_text(json.dumps({"url": url, "validator": validator}))


def test_a_part_from_a_file_changed_upstream_restarts_from_zero(host, authors_bytes):
    entry = REGISTRY["selavpr-msls"]
    host.files["/SelaVPR_msls.pth"] = authors_bytes
    _leave_part(entry, f"{host.url}/SelaVPR_msls.pth", b"older bytes", validator='"an-older-etag"')

    cached = fetch(entry, mirror=host.url, progress=False)

    assert host.file_requests("/SelaVPR_msls.pth")[0].if_range == '"an-older-etag"'
    assert cached.path.read_bytes() == authors_bytes


def test_a_whole_part_answered_416_is_installed(host, authors_bytes):
    entry = REGISTRY["selavpr-msls"]
    host.files["/SelaVPR_msls.pth"] = authors_bytes
    etag = '"' + sha256(authors_bytes)[:16] + '"'
    _leave_part(entry, f"{host.url}/SelaVPR_msls.pth", authors_bytes, validator=etag)

    cached = fetch(entry, mirror=host.url, progress=False)

    assert host.file_requests("/SelaVPR_msls.pth")[0].range == f"bytes={len(authors_bytes)}-"
    assert cached.path.read_bytes() == authors_bytes


def test_a_server_that_ignores_range_restarts_from_zero(host, authors_bytes, monkeypatch):
    monkeypatch.setattr("model.weights.download.time.sleep", lambda s: None)
    host.files["/SelaVPR_msls.pth"] = authors_bytes
    host.cut_once.add("/SelaVPR_msls.pth")
    host.ignore_range = True

    cached = fetch(REGISTRY["selavpr-msls"], mirror=host.url, progress=False)

    assert cached.path.read_bytes() == authors_bytes


def test_a_wrong_hash_is_refused_and_not_cached(host, authors_bytes, monkeypatch):
    entry = replace(REGISTRY["selavpr-msls"], sha256="0" * 64)
    host.files["/SelaVPR_msls.pth"] = authors_bytes

    with pytest.raises(DownloadError, match="differs from the registry's 0000"):
        fetch(entry, mirror=host.url, progress=False)

    assert find_cached(entry) is None and cache_files(entry.name) == []


class _RunsAShell:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def _malicious_zip() -> bytes:
    buffer = io.BytesIO()
    torch.save({"model_state_dict": {"w": torch.zeros(2)}, "hook": _RunsAShell()}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "payload, refusal",
    [
        (lambda: pickle.dumps(_RunsAShell(), protocol=2), "refused to load"),  # a legacy pickle
        (_malicious_zip, "could run arbitrary code"),  # a torch zip whose pickle calls os.system
        (lambda: b"PK\x03\x04" + b"\x00" * 64, "truncated or corrupt"),
        (lambda: b"<html>not a checkpoint</html>", "not a checkpoint"),
    ],
)
def test_unsafe_or_corrupt_files_are_refused_by_the_loader_and_not_cached(
    host, payload, refusal, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    host.files["/SelaVPR_msls.pth"] = payload()
    entry = REGISTRY["selavpr-msls"]

    with pytest.raises(CheckpointError, match=f"refused, not cached: .*{refusal}"):
        fetch(entry, mirror=host.url, progress=False)

    assert not (tmp_path / "pwned-by-checkpoint").exists()
    assert find_cached(entry) is None and cache_files(entry.name) == []


def test_a_file_of_the_wrong_layout_is_refused(host, dinov2_bytes):
    host.files["/SelaVPR_msls.pth"] = dinov2_bytes  # a DINOv2 backbone where the authors' model belongs

    with pytest.raises(CheckpointError, match="'dinov2' checkpoint, the registry expects 'selavpr-authors'"):
        fetch(REGISTRY["selavpr-msls"], mirror=host.url, progress=False)
    assert cache_files("selavpr-msls") == []


@pytest.mark.parametrize("style", ["form", "link", "cookie"])
def test_google_drive_confirmation_page_is_followed(host, authors_bytes, style, monkeypatch):
    host.drive_style = style
    host.drive_files["FILEID"] = authors_bytes
    entry = replace(REGISTRY["selavpr-msls"], url=host.drive_url("FILEID"))
    monkeypatch.setitem(REGISTRY, entry.name, entry)

    assert main(["weights", "fetch", "selavpr-msls", "--no-progress"]) == 0

    assert find_cached(entry).path.read_bytes() == authors_bytes
    pages = [s.path for s in host.seen]
    assert pages == (["/uc", "/download"] if style == "form" else ["/uc", "/uc"])


def test_a_drive_page_without_a_way_through_is_a_clear_error(host, authors_bytes):
    host.drive_style = "quota"
    host.drive_files["FILEID"] = authors_bytes
    entry = replace(REGISTRY["selavpr-msls"], url=host.drive_url("FILEID"))

    with pytest.raises(DownloadError, match=r"\('Google Drive - Quota exceeded'\) instead of selavpr-msls"):
        fetch(entry, progress=False)
    assert cache_files(entry.name) == []


def test_offline_is_a_clear_error_with_exit_2_and_nothing_written(capsys):
    url = closed_port_url()

    with pytest.raises(DownloadError, match=OFFLINE_MESSAGE):
        fetch(REGISTRY["selavpr-msls"], mirror=url, progress=False)
    assert main(["weights", "fetch", "selavpr-msls", "--mirror", url]) == 2

    assert OFFLINE_MESSAGE in capsys.readouterr().err
    assert not (weights_root() / "selavpr-msls").exists()


def test_an_http_error_names_the_status(host):
    with pytest.raises(DownloadError, match="answered HTTP 404"):
        fetch(REGISTRY["selavpr-pitts30k"], mirror=host.url, progress=False)
    assert cache_files("selavpr-pitts30k") == []


# --- the cache ----------------------------------------------------------------------------------------


def test_a_cached_file_changed_after_download_is_refused_at_load(host, authors_bytes):
    host.files["/SelaVPR_msls.pth"] = authors_bytes
    cached = fetch(REGISTRY["selavpr-msls"], mirror=host.url, progress=False)
    cached.path.write_bytes(authors_bytes[:-1] + bytes([authors_bytes[-1] ^ 1]))

    with pytest.raises(CheckpointError, match="recorded at its first download.*--force"):
        load_model("selavpr-msls")


def test_fetch_from_a_local_file_and_list(tmp_path, authors_bytes, capsys):
    local = tmp_path / "downloaded-by-hand.pth"
    local.write_bytes(authors_bytes)

    assert main(["weights", "fetch", "selavpr-reg4-msls", "--file", str(local)]) == 0
    fetched = json.loads(capsys.readouterr().out)
    assert fetched["sha256"] == sha256(authors_bytes) and fetched["source"] == str(local)

    assert main(["weights", "list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert rows["selavpr-reg4-msls"]["cached"] and rows["selavpr-reg4-msls"]["path"] == fetched["path"]
    assert not rows["selavpr-msls"]["cached"] and rows["selavpr-msls"]["sha256"].startswith("unknown")
    assert main(["weights", "list"]) == 0
    table = capsys.readouterr().out
    assert "dinov2-vitg14-reg4" in table and "~4.5 GB" in table


# --- the Drive page parser ----------------------------------------------------------------------------


def test_confirmation_url_reads_the_form_and_the_link():
    form = (
        '<form id="download-form" action="https://drive.usercontent.google.com/download" method="get">'
        '<input type="hidden" name="id" value="ABC"><input type="hidden" name="confirm" value="t">'
        '<input type="hidden" name="uuid" value="u-1"></form>'
    )
    assert confirmation_url(form, "https://drive.google.com/uc?export=download&id=ABC") == (
        "https://drive.usercontent.google.com/download?id=ABC&confirm=t&uuid=u-1"
    )
    link = '<a href="/uc?export=download&amp;confirm=Tk&amp;id=ABC">Download anyway</a>'
    assert confirmation_url(link, "https://drive.google.com/uc?export=download&id=ABC") == (
        "https://drive.google.com/uc?export=download&confirm=Tk&id=ABC"
    )
    assert confirmation_url("<html><title>Sign in</title></html>", "https://drive.google.com/uc?id=A") is None


# --- the service ----------------------------------------------------------------------------------------


def _serve(tmp_path, refs) -> subprocess.Popen:
    from tests.servers import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--references", str(refs)]
    cmd += ["--index-dir", str(tmp_path / "index"), "--checkpoint", "selavpr-msls", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.base = f"http://127.0.0.1:{port}"
    return proc


def test_serve_by_name_downloads_verifies_caches_and_serves(
    host, authors_bytes, tmp_path, shared_data, monkeypatch
):
    """`selavpr serve --checkpoint selavpr-msls`, with the mirror standing in for Google Drive."""
    refs = tmp_path / "refs"
    shutil.copytree(shared_data / "matching_triplets" / "p0", refs / "p0")
    host.files["/SelaVPR_msls.pth"] = authors_bytes
    monkeypatch.setenv("SELAVPR_MIRROR_URL", host.url)
    proc = _serve(tmp_path, refs)
    try:
        deadline = time.monotonic() + 90
        while not _ready(proc.base):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "not ready in time"
            time.sleep(0.2)
        image = next((refs / "p0" / "i1").iterdir())
        response = httpx.post(
            f"{proc.base}/localize", files={"image": ("q.jpg", image.read_bytes())}, timeout=30
        )
        assert response.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert find_cached(REGISTRY["selavpr-msls"]).record.sha256 == sha256(authors_bytes)
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "index").rglob("manifest.json")]
    assert [m["checkpoint"]["spec"] for m in manifests] == ["selavpr-msls"]  # portable: the name, not a path


def test_serve_by_name_offline_exits_2_before_starting(tmp_path, monkeypatch):
    monkeypatch.setenv("SELAVPR_MIRROR_URL", closed_port_url())
    proc = _serve(tmp_path, tmp_path / "refs")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and OFFLINE_MESSAGE in output
    assert "Uvicorn running" not in output


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
