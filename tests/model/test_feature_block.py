"""Training-free descriptors from an intermediate block: the forward, the defaults, the index identity, the
settings, and the eval sweep. Trained SelaVPR checkpoints must keep the paper's path exactly."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from app.cli import build_parser, main
from app.commands.serve import settings_from
from app.settings import Settings
from bench.shared_dataset import make_dataset
from index_builder.builder import BuildConfig, build_index
from index_builder.manifest import EncodingIdentity
from index_builder.search import CheckpointMismatch, Localizer, extractor_for
from index_builder.store import IndexVersion
from model.config import FINAL, LocalMode, SelaVPRConfig, parse_feature_block, training_free_block
from model.errors import CheckpointError
from model.extractor import FeatureExtractor
from model.options import ModelOptions
from model.selavpr import SelaVPR
from model.weights.loading import load_model
from tests.helpers import dinov2_checkpoint, randomize, tiny_checkpoint, tiny_vit
from tests.reference import selavpr_reference

DEPTH = 6


def plain_model(depth: int = DEPTH, registers: int = 0) -> SelaVPR:
    return randomize(SelaVPR(SelaVPRConfig(tiny_vit(registers, depth=depth), adapters=False)), seed=3)


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory) -> Path:
    """An official-DINOv2-style backbone file: no adapters, no local head, so used training-free."""
    return dinov2_checkpoint(tmp_path_factory.mktemp("dinov2") / "tiny_dinov2.pth", plain_model())


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("trained") / "tiny")


# --- the forward -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("registers", [0, 4])
def test_block_output_equals_running_the_blocks_by_hand(registers):
    model = plain_model(registers=registers)
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        x = model.backbone.prepare_tokens(images)
        by_hand = []
        for block in model.backbone.blocks:
            x = block(x)
            by_hand.append(x[:, 1 + registers :])  # raw block output, no final norm
        for n in range(DEPTH):
            assert torch.equal(model.backbone(images, n), by_hand[n])
        final = model.backbone(images, FINAL)
    assert torch.equal(final, model.backbone.norm(x)[:, 1 + registers :])
    assert not torch.allclose(final, by_hand[-1], atol=1e-3)  # the last block without norm is another thing


def test_the_forward_stops_after_the_feature_block():
    model = plain_model()
    ran: list[str] = []
    for i, block in enumerate(model.backbone.blocks):
        block.register_forward_hook(lambda *_, i=i: ran.append(f"block{i}"))
    model.backbone.norm.register_forward_hook(lambda *_: ran.append("norm"))
    with torch.no_grad():
        model(torch.randn(1, 3, 56, 56), LocalMode.PATCH_TOKENS, 2)
        assert ran == ["block0", "block1", "block2"]
        ran.clear()
        model(torch.randn(1, 3, 56, 56), LocalMode.PATCH_TOKENS)
    assert ran == [f"block{i}" for i in range(DEPTH)] + ["norm"]


def test_the_block_changes_both_descriptors():
    model = plain_model()
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        outs = [model(images, LocalMode.PATCH_TOKENS, b) for b in (2, 4, FINAL)]
    for a, b in itertools.pairwise(outs):
        assert not torch.allclose(a.global_desc, b.global_desc, atol=1e-3)
        assert not torch.allclose(a.local, b.local, atol=1e-3)
    assert outs[0].feature_block == 2 and outs[2].feature_block == FINAL
    grid = model.patch_map(images, 4).permute(0, 2, 3, 1)
    torch.testing.assert_close(outs[1].local, F.normalize(grid, dim=-1))  # patch tokens of that block


# --- defaults and checks -----------------------------------------------------------------------------


def test_depth_rule_and_parsing():
    assert [training_free_block(d) for d in (12, 24, 40)] == [8, 16, 27]
    assert parse_feature_block("8") == 8 and parse_feature_block(" Final ") == FINAL
    for bad in ("-1", "eight", "", "8.5"):
        with pytest.raises(ValueError, match="feature block"):
            parse_feature_block(bad)


def test_plain_backbone_defaults_to_the_depth_rule(plain_ckpt):
    extractor = FeatureExtractor(load_model(plain_ckpt), image_size=112)
    assert extractor.feature_block == training_free_block(DEPTH) == 4
    images = torch.randn(2, 3, 112, 112)
    global_desc, local = extractor.extract_tensors(images)
    with torch.no_grad():
        expected = extractor.model(images, LocalMode.PATCH_TOKENS, 4)
    assert torch.equal(global_desc, expected.global_desc) and torch.equal(local, expected.local)
    with pytest.raises(ValueError, match="blocks 0-5"):
        FeatureExtractor(load_model(plain_ckpt), feature_block=DEPTH)


def test_trained_checkpoint_keeps_the_papers_path_exactly(trained_ckpt):
    loaded = load_model(trained_ckpt)
    extractor = FeatureExtractor(loaded)
    assert extractor.feature_block == FINAL and extractor.local_mode is LocalMode.LOCAL_HEAD
    images = torch.randn(2, 3, 112, 112)
    global_desc, local = extractor.extract_tensors(images)
    ref_global, ref_local, _ = selavpr_reference(loaded.model.state_dict(), images, 2)
    torch.testing.assert_close(global_desc, ref_global, atol=1e-5, rtol=0)
    torch.testing.assert_close(local, ref_local, atol=1e-5, rtol=0)


def test_trained_head_refuses_an_intermediate_block(trained_ckpt):
    loaded = load_model(trained_ckpt)
    with pytest.raises(CheckpointError, match="local head takes the final-norm tokens"):
        FeatureExtractor(loaded, feature_block=1)
    # the adapted backbone's intermediate tokens stay available for training-free matching
    extractor = FeatureExtractor(loaded, feature_block=1, local_mode=LocalMode.PATCH_TOKENS)
    assert extractor.feature_block == 1


# --- what an index records -----------------------------------------------------------------------------


@pytest.fixture
def refs(tmp_path, shared_data) -> Path:
    root = tmp_path / "refs"
    for place in ("p0", "p1"):
        for view in sorted((shared_data / "matching_triplets" / place).iterdir()):
            (root / place).mkdir(parents=True, exist_ok=True)
            image = next(view.iterdir())
            (root / place / f"{view.name}{image.suffix}").write_bytes(image.read_bytes())
    return root


def build(refs: Path, index_dir: Path, ckpt: Path, feature_block=None):
    model = ModelOptions(checkpoint=str(ckpt), device="cpu", image_size=112, feature_block=feature_block)
    return build_index(BuildConfig(references=refs, index_dir=index_dir, model=model))


def test_the_index_records_the_block_and_a_change_reencodes(refs, tmp_path, plain_ckpt):
    index_dir = tmp_path / "index"
    first = build(refs, index_dir, plain_ckpt)
    version = IndexVersion.open_current(index_dir)
    assert version.identity.feature_block == 4 and version.manifest.encoding.feature_block == 4
    assert extractor_for(version, device="cpu").feature_block == 4  # search uses what was recorded
    version.close()
    assert build(refs, index_dir, plain_ckpt).encoded == 0  # same block: nothing to do
    changed = build(refs, index_dir, plain_ckpt, feature_block=2)
    assert first.encoded == changed.encoded == changed.total == 6 and changed.reused == 0
    version = IndexVersion.open_current(index_dir)
    try:
        assert version.identity.feature_block == 2
        assert extractor_for(version, device="cpu").feature_block == 2  # not the checkpoint's default
        default = FeatureExtractor(load_model(plain_ckpt), image_size=112)
        with pytest.raises(CheckpointMismatch, match="feature block 2"):
            Localizer(version, default)
    finally:
        version.close()


def test_identities_written_before_the_field_read_as_the_final_norm_path():
    recorded = {
        "fingerprint": "abc",
        "local_mode": "patch_tokens",
        "image_size": 224,
        "exif_transpose": True,
        "local_dtype": "int8",
        "global_dim": 384,
        "local_shape": [16, 16, 384],
    }
    old = EncodingIdentity.from_dict(recorded)
    assert old.feature_block == FINAL
    assert old != EncodingIdentity.from_dict({**recorded, "feature_block": 8})
    assert EncodingIdentity.from_dict(json.loads(json.dumps(old.to_dict()))) == old


# --- settings and command line -------------------------------------------------------------------------


def test_service_setting_from_environment_and_flag(monkeypatch):
    assert Settings().feature_block is None
    monkeypatch.setenv("SELAVPR_FEATURE_BLOCK", "7")
    assert Settings().feature_block == 7
    monkeypatch.setenv("SELAVPR_FEATURE_BLOCK", "final")
    assert Settings().feature_block == FINAL
    monkeypatch.setenv("SELAVPR_FEATURE_BLOCK", "seven")
    with pytest.raises(ValueError, match="feature block"):
        Settings()
    monkeypatch.delenv("SELAVPR_FEATURE_BLOCK")
    assert settings_from(build_parser().parse_args(["serve", "--feature-block", "5"])).feature_block == 5


def test_match_and_weights_report_the_block(capsys, plain_ckpt, shared_data):
    image = next((shared_data / "matching_triplets" / "p0" / "i0").iterdir())
    args = ["match", str(image), str(image), "--checkpoint", str(plain_ckpt), "--device", "cpu"]
    assert main([*args, "--feature-block", "3", "--image-size", "112"]) == 0
    assert json.loads(capsys.readouterr().out)["feature_block"] == 3
    assert main(["weights", "info", str(plain_ckpt)]) == 0
    assert json.loads(capsys.readouterr().out)["default_feature_block"] == 4
    assert main([*args, "--feature-block", "12"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_sweeps_blocks_on_the_shared_images(tmp_path, shared_data, capsys):
    """Real default weights: the sweep's table and JSON, one cached index per block, and the default
    block re-ranks at least as well as the final-norm path on the shared images."""
    root = make_dataset(tmp_path / "ds", shared_data)
    out = tmp_path / "sweep.json"
    argv = ["eval", "--dataset", str(root), "--device", "cpu", "--recalls", "1,5", "--rerank-k", "10"]
    argv += ["--feature-blocks", "8,final", "--index-dir", str(tmp_path / "idx"), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "re-ranked R@1" in printed and "\nfinal " in printed and "\n8 " in printed
    reports = json.loads(out.read_text())["feature_blocks"]
    assert [r["feature_block"] for r in reports] == [8, FINAL]
    assert all(r["queries"] == 10 and r["local_mode"] == "patch_tokens" for r in reports)
    assert reports[0]["reranked"]["1"] >= reports[1]["reranked"]["1"]
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["feature-block-8", "feature-block-final"]
    assert main([*argv[:-2], "--plot", str(tmp_path / "p.png")]) == 2  # one plot per evaluation only
