"""The network against spec sections 1-4: key names, parameter counts, exact computation, shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import LocalMode, SelaVPRConfig, local_side, patch_grid, vit_config
from model.pos_embed import interpolate_pos_embed
from model.selavpr import SelaVPR
from tests.helpers import tiny_model, tiny_vit
from tests.reference import pos_embed_reference, selavpr_reference


def spec_state_dict_shapes(dim: int, depth: int, registers: int = 0) -> dict[str, tuple[int, ...]]:
    """Spec sections 1-4 and 8, written out: every key of a SelaVPR model and its shape."""
    shapes = {
        "backbone.cls_token": (1, 1, dim),
        "backbone.pos_embed": (1, 1370, dim),
        "backbone.mask_token": (1, dim),
        "backbone.patch_embed.proj.weight": (dim, 3, 14, 14),
        "backbone.patch_embed.proj.bias": (dim,),
        "backbone.norm.weight": (dim,),
        "backbone.norm.bias": (dim,),
        "aggregation.1.p": (1,),
        "LocalAdapt.upconv1.weight": (dim, 256, 3, 3),
        "LocalAdapt.upconv1.bias": (256,),
        "LocalAdapt.upconv2.weight": (256, 128, 3, 3),
        "LocalAdapt.upconv2.bias": (128,),
    }
    if registers:
        shapes["backbone.register_tokens"] = (1, registers, dim)
    for n in range(depth):
        p = f"backbone.blocks.{n}."
        shapes |= {
            p + "norm1.weight": (dim,),
            p + "norm1.bias": (dim,),
            p + "attn.qkv.weight": (3 * dim, dim),
            p + "attn.qkv.bias": (3 * dim,),
            p + "attn.proj.weight": (dim, dim),
            p + "attn.proj.bias": (dim,),
            p + "ls1.gamma": (dim,),
            p + "norm2.weight": (dim,),
            p + "norm2.bias": (dim,),
            p + "mlp.fc1.weight": (4 * dim, dim),
            p + "mlp.fc1.bias": (4 * dim,),
            p + "mlp.fc2.weight": (dim, 4 * dim),
            p + "mlp.fc2.bias": (dim,),
            p + "ls2.gamma": (dim,),
        }
        for adapter in ("adapter1", "adapter2"):
            shapes |= {
                f"{p}{adapter}.D_fc1.weight": (dim // 2, dim),
                f"{p}{adapter}.D_fc1.bias": (dim // 2,),
                f"{p}{adapter}.D_fc2.weight": (dim, dim // 2),
                f"{p}{adapter}.D_fc2.bias": (dim,),
            }
    return shapes


def meta_model(size: str, registers: int = 0) -> SelaVPR:
    with torch.device("meta"):
        return SelaVPR(SelaVPRConfig(vit_config(size, registers)))


@pytest.mark.parametrize("registers, expected_keys", [(0, 540), (4, 541)])
def test_vitl_state_dict_matches_spec(registers, expected_keys):
    sd = meta_model("vitl14", registers).state_dict()
    assert len(sd) == expected_keys
    assert {k: tuple(v.shape) for k, v in sd.items()} == spec_state_dict_shapes(1024, 24, registers)


def test_vitl_trainable_parameters_match_spec():
    model = meta_model("vitl14")
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == 53_059_969
    assert sum(v for n, v in trainable.items() if ".adapter" in n) == 50_405_376
    assert sum(v for n, v in trainable.items() if n.startswith("LocalAdapt.")) == 2_654_592
    assert trainable["aggregation.1.p"] == 1
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(n.startswith("backbone.") and ".adapter" not in n for n in frozen)
    assert "backbone.pos_embed" in frozen and "backbone.blocks.0.ls1.gamma" in frozen


@pytest.mark.parametrize(
    "size, dim, depth, heads", [("vits14", 384, 12, 6), ("vitb14", 768, 12, 12), ("vitl14", 1024, 24, 16)]
)
def test_vit_sizes(size, dim, depth, heads):
    cfg = vit_config(size)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.hidden_features) == (dim, depth, heads, 4 * dim)
    assert spec_state_dict_shapes(dim, depth).keys() == meta_model(size).state_dict().keys()


def test_vitg_uses_swiglu():
    sd = meta_model("vitg14").state_dict()
    assert sd["backbone.blocks.39.mlp.w12.weight"].shape == (8192, 1536)
    assert sd["backbone.blocks.39.mlp.w3.weight"].shape == (1536, 4096)


def test_zero_initialised_adapters_reproduce_plain_backbone_exactly():
    adapted = tiny_model(adapters=True, seed=1)
    for module in adapted.modules():
        if hasattr(module, "D_fc2"):
            module.reset_parameters()  # the training initialisation: D_fc2 = 0
    plain = SelaVPR(SelaVPRConfig(tiny_vit(), adapters=False)).eval()
    plain.load_state_dict({k: v for k, v in adapted.state_dict().items() if ".adapter" not in k})
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        a, p = adapted(images), plain(images)
    assert torch.equal(a.global_desc, p.global_desc)
    assert torch.equal(a.local, p.local)
    assert adapted.backbone.blocks[0].adapter1.D_fc1.weight.abs().sum() > 0  # fc1 is random, as in training


@pytest.mark.parametrize("registers", [0, 4])
def test_forward_matches_direct_reference(registers):
    model = tiny_model(num_registers=registers, seed=2)
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ours = model(images, LocalMode.LOCAL_HEAD)
        tokens = model(images, LocalMode.PATCH_TOKENS).local
        ref_global, ref_local, ref_grid = selavpr_reference(model.state_dict(), images, 2, registers)
    torch.testing.assert_close(ours.global_desc, ref_global, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.local, ref_local, atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens, F.normalize(ref_grid, dim=-1), atol=1e-5, rtol=0)


def test_adapters_change_the_output():
    """Guards the reference comparison above: non-zero adapters must matter."""
    model = tiny_model(seed=3)
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        before = model(images).global_desc
        model.backbone.blocks[0].adapter2.D_fc2.weight.mul_(2)
        after = model(images).global_desc
    assert (before - after).abs().max() > 1e-4


@pytest.mark.parametrize("grid", [4, 16, 22, 36])
def test_pos_embed_follows_the_offset_rule(grid):
    table = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(grid))
    ours = interpolate_pos_embed(table, grid, grid)
    assert ours.shape == (1, 1 + grid * grid, 8)
    # float32 bicubic against a float64 reference on N(0, 1) values: agreement to ~1e-5
    torch.testing.assert_close(ours, pos_embed_reference(table, grid), atol=5e-5, rtol=0)
    assert torch.equal(ours[:, 0], table[:, 0])  # the class entry is not interpolated
    plain = F.interpolate(
        table[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic"
    )
    plain = plain.permute(0, 2, 3, 1).reshape(1, grid * grid, 8)
    assert (ours[:, 1:] - plain).abs().max() > 1e-3


def test_pos_embed_untouched_at_518():
    table = torch.randn(1, 1 + 37 * 37, 8)
    assert interpolate_pos_embed(table, 37, 37) is table


def test_pos_embed_cached_per_size_and_refreshed_on_new_weights():
    model = tiny_model()
    backbone = model.backbone
    first = backbone.pos_embed_for(16, 16)
    assert backbone.pos_embed_for(16, 16) is first
    assert backbone.pos_embed_for(20, 20).shape[1] == 401
    state = model.state_dict()
    state["backbone.pos_embed"] = state["backbone.pos_embed"] + 1
    model.load_state_dict(state)
    refreshed = backbone.pos_embed_for(16, 16)
    assert refreshed is not first
    torch.testing.assert_close(refreshed, first + 1)


@pytest.mark.parametrize("side", [56, 112, 224])
def test_output_shapes_and_unit_norms(side):
    model = tiny_model(num_registers=4)
    g = patch_grid(side)
    with torch.no_grad():
        head = model(torch.randn(3, 3, side, side), LocalMode.LOCAL_HEAD)
        tokens = model(torch.randn(3, 3, side, side), LocalMode.PATCH_TOKENS)
    assert head.global_desc.shape == (3, 128)
    assert head.local.shape == (3, local_side(g), local_side(g), 128)
    assert tokens.local.shape == (3, g, g, 128)
    for t in (head.global_desc, head.local, tokens.local):
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1]))


def test_local_side_is_61_at_224():
    assert local_side(patch_grid(224)) == 61


def test_non_square_input():
    model = tiny_model()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 112, 168))
    assert out.local.shape == (1, local_side(8), local_side(12), 128)


def test_input_not_multiple_of_patch_is_rejected():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_model()(torch.randn(1, 3, 100, 100))
