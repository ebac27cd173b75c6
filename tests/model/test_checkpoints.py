"""Every checkpoint format loads, with its architecture read off the tensors; bad files get one message."""

from __future__ import annotations

import json
import os
import re
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model.config import LocalMode
from model.errors import CheckpointError
from model.weights.formats import CheckpointFormat
from model.weights.loading import load_model
from model.weights.project_format import save_checkpoint
from model.weights.unpickle import safe_torch_load
from tests.helpers import authors_checkpoint, dinov2_checkpoint, tiny_model

IMAGES = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))


def outputs(loaded, mode=None):
    with torch.no_grad():
        out = loaded.model(IMAGES, mode or loaded.info.default_local_mode)
    return out.global_desc, out.local


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_authors_checkpoint_with_numpy_objects_loads(tmp_path):
    model = tiny_model(num_registers=4, seed=1)
    loaded = load_model(authors_checkpoint(tmp_path / "SelaVPR_tiny.pth", model))
    assert loaded.info.format is CheckpointFormat.SELAVPR_AUTHORS
    assert loaded.info.trained_adapters and loaded.info.trained_local_head
    assert loaded.info.default_local_mode is LocalMode.LOCAL_HEAD
    cfg = loaded.model.cfg.vit
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.num_registers, cfg.pos_grid) == (128, 2, 2, 4, 6)
    with torch.no_grad():
        expected = model(IMAGES)
    got_global, got_local = outputs(loaded)
    assert torch.equal(got_global, expected.global_desc) and torch.equal(got_local, expected.local)


def test_numpy1_module_names_load(tmp_path):
    """Checkpoints pickled under numpy 1.x name `numpy.core.multiarray`, which numpy 2 renamed."""
    path = authors_checkpoint(tmp_path / "new.pth", tiny_model())
    old = tmp_path / "numpy1.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(item, data)
    assert load_model(old).info.format is CheckpointFormat.SELAVPR_AUTHORS


def test_legacy_torch_format_loads(tmp_path):
    loaded = load_model(authors_checkpoint(tmp_path / "legacy.pth", tiny_model(), legacy=True))
    assert loaded.info.trained_local_head


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, legacy):
    marker = tmp_path / "pwned"
    Evil.marker = marker
    path = tmp_path / "evil.pth"
    torch.save(
        {"model_state_dict": tiny_model().state_dict(), "x": Evil()},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(CheckpointError, match="refused to load") as err:
        load_model(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


class ForgedObjectDtype:
    """Pickles as numpy.dtype('V8') whose state claims an object field with the object flags cleared:
    an array of it would read raw pickle bytes back as object pointers."""

    def __reduce__(self):
        return (np.dtype, ("V8", False, True), (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))


class ForgedArray:
    def __reduce__(self):
        core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
        state = (1, (1,), ForgedObjectDtype(), False, (0x4141414141414141).to_bytes(8, "little"))
        return (core._reconstruct, (np.ndarray, (0,), b"b"), state)


@pytest.mark.parametrize("legacy", [False, True])
def test_forged_structured_dtype_is_refused_naming_it(tmp_path, legacy):
    path = tmp_path / "forged.pth"
    torch.save(
        {"model_state_dict": tiny_model().state_dict(), "recalls": ForgedArray()},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(CheckpointError, match="refused to load") as err:
        load_model(path)
    assert "numpy.dtype('V8')" in str(err.value) and "not a plain numeric dtype" in str(err.value)


def test_numeric_numpy_values_still_load(tmp_path):
    path = tmp_path / "recalls.pth"
    recalls = np.array([0.5, 0.75], dtype=np.float64)
    torch.save({"model_state_dict": tiny_model().state_dict(), "recalls": recalls, "n": np.int64(3)}, path)
    loaded = safe_torch_load(path)
    assert np.array_equal(loaded["recalls"], recalls) and loaded["n"] == 3


def test_dinov2_backbone_file_runs_as_plain_dinov2(tmp_path):
    model = tiny_model(seed=2)
    for module in model.modules():
        if hasattr(module, "D_fc2"):
            module.reset_parameters()  # zero adapters == plain DINOv2
    with torch.no_grad():
        model.aggregation[1].p.fill_(3.0)  # a backbone file carries no GeM p: the initial 3 applies
    loaded = load_model(dinov2_checkpoint(tmp_path / "dinov2_vits14_pretrain.pth", model))
    assert loaded.info.format is CheckpointFormat.DINOV2
    assert not loaded.info.trained_adapters and not loaded.info.trained_local_head
    assert loaded.info.default_local_mode is LocalMode.PATCH_TOKENS
    assert loaded.model.backbone.blocks[0].adapter1 is None
    with torch.no_grad():
        expected = model(IMAGES, LocalMode.PATCH_TOKENS)
    got_global, got_local = outputs(loaded)
    assert torch.equal(got_global, expected.global_desc) and torch.equal(got_local, expected.local)
    with pytest.raises(CheckpointError, match="needs a trained LocalAdapt head"):
        loaded.info.check_local_mode(LocalMode.LOCAL_HEAD)


def test_chunked_block_keys_are_accepted(tmp_path):
    model = tiny_model(adapters=False)
    # DINOv2's FSDP layout: blocks.<chunk>.<block>.*, here all blocks in chunk 0.
    state = {
        re.sub(r"^blocks\.(\d+)\.", r"blocks.0.\1.", k.removeprefix("backbone.")): v
        for k, v in model.state_dict().items()
        if k.startswith("backbone.")
    }
    assert "blocks.0.1.attn.qkv.weight" in state
    torch.save(state, tmp_path / "chunked.pth")
    assert load_model(tmp_path / "chunked.pth").model.cfg.vit.depth == 2


def test_project_format_round_trip_and_fingerprint(tmp_path):
    model = tiny_model(seed=3)
    authors = load_model(authors_checkpoint(tmp_path / "a.pth", model))
    out = save_checkpoint(
        authors.model,
        tmp_path / "ours",
        description="tiny",
        trained_adapters=True,
        trained_local_head=True,
        image_size=112,
        metadata={"epochs": 1},
    )
    config = json.loads((out / "config.json").read_text())
    assert config["local_mode"] == "local_head" and config["image_size"] == 112
    ours = load_model(out)
    assert ours.info.format is CheckpointFormat.SELAVPR
    assert ours.info.fingerprint == authors.info.fingerprint == config["fingerprint"]
    assert ours.info.image_size == 112 and ours.info.metadata == {"epochs": 1}
    for a, b in zip(outputs(ours), outputs(authors), strict=True):
        assert torch.equal(a, b)
    other = load_model(authors_checkpoint(tmp_path / "b.pth", tiny_model(seed=4)))
    assert other.info.fingerprint != authors.info.fingerprint


def test_project_format_overwrite_is_whole(tmp_path):
    target = tmp_path / "ckpt"
    for seed in (5, 6):
        save_checkpoint(
            tiny_model(seed=seed),
            target,
            description=f"seed {seed}",
            trained_adapters=True,
            trained_local_head=True,
        )
    assert load_model(target).info.description == "seed 6"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or old copies left


def test_bare_safetensors_state_dict(tmp_path):
    model = tiny_model(seed=7)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    loaded = load_model(tmp_path / "w.safetensors")
    assert loaded.info.format is CheckpointFormat.STATE_DICT and loaded.info.trained_local_head


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory; expected 'default'"):
        load_model(tmp_path / "nope.pth")


def test_truncated_file(tmp_path):
    path = authors_checkpoint(tmp_path / "full.pth", tiny_model())
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pth: truncated or corrupt checkpoint"):
        load_model(cut)


def test_truncated_safetensors(tmp_path):
    save_file(tiny_model().state_dict(), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors"):
        load_model(tmp_path / "w.safetensors")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(tmp_path / "notes.pth")


def test_unknown_layout(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="unknown state-dict layout"):
        load_model(tmp_path / "other.pth")
    torch.save({"epoch": 3}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="unknown layout"):
        load_model(tmp_path / "meta.pth")


def test_wrong_shape_and_missing_tensors(tmp_path):
    state = tiny_model().state_dict()
    state["backbone.blocks.1.attn.proj.weight"] = torch.zeros(128, 64)
    del state["backbone.blocks.0.mlp.fc2.bias"]
    torch.save({"model_state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.pth")
    message = str(err.value)
    assert "bad.pth" in message and "1 missing: backbone.blocks.0.mlp.fc2.bias" in message
    assert "backbone.blocks.1.attn.proj.weight (128, 64) (expected (128, 128))" in message


def test_project_dir_with_tampered_weights(tmp_path):
    out = save_checkpoint(
        tiny_model(seed=8), tmp_path / "c", description="x", trained_adapters=True, trained_local_head=True
    )
    save_file(tiny_model(seed=9).state_dict(), out / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not match the fingerprint"):
        load_model(out)


def test_project_dir_with_broken_config(tmp_path):
    out = save_checkpoint(
        tiny_model(), tmp_path / "c", description="x", trained_adapters=True, trained_local_head=True
    )
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid checkpoint config"):
        load_model(out)
    (out / "config.json").unlink()
    with pytest.raises(CheckpointError, match="needs model.safetensors and config.json"):
        load_model(out)
