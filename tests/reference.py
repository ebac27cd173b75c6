"""Direct, unoptimised implementations of the spec, written independently of model/ to test it against.

Everything here works from a state dict and plain tensor operations: explicit softmax attention, the
full similarity tensor for MNN, an explicit bicubic weight matrix for the positional embedding.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def bicubic_matrix(out_size: int, in_size: int, scale_factor: float) -> np.ndarray:
    """(out, in) weights of 1-D bicubic resampling (A = -0.75, half-pixel centres, clamped borders)
    whose sampling grid follows `scale_factor` (source = (dst + 0.5) / scale_factor - 0.5)."""
    a = -0.75

    def kernel(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.0

    weights = np.zeros((out_size, in_size))
    for dst in range(out_size):
        src = (dst + 0.5) / scale_factor - 0.5
        base = math.floor(src)
        for tap in range(base - 1, base + 3):
            weights[dst, min(max(tap, 0), in_size - 1)] += kernel(src - tap)
    return weights


def pos_embed_reference(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Spec section 1: bicubic with scale factor (g + 0.1) / 37, computed in float64 here."""
    side = math.isqrt(pos_embed.shape[1] - 1)
    table = pos_embed[0, 1:].double().reshape(side, side, -1).numpy()
    w = bicubic_matrix(grid, side, (grid + 0.1) / side)
    patch = np.einsum("ai,ijd,bj->abd", w, table, w).reshape(grid * grid, -1)
    return torch.cat([pos_embed[0, :1].double(), torch.from_numpy(patch)]).unsqueeze(0).float()


def _linear(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _layer_norm(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)


def _adapter(x, sd, name):
    return _linear(torch.relu(_linear(x, sd, name + ".D_fc1")), sd, name + ".D_fc2")


def selavpr_reference(
    sd: dict[str, torch.Tensor], images: torch.Tensor, num_heads: int, num_registers: int = 0
):
    """SelaVPR forward from a state dict with `backbone.*` keys -> (global (B, D), local (B, h, w, 128),
    patch tokens (B, g, g, D))."""
    b, _, h, w = images.shape
    gh, gw = h // 14, w // 14
    x = F.conv2d(
        images, sd["backbone.patch_embed.proj.weight"], sd["backbone.patch_embed.proj.bias"], stride=14
    )
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["backbone.cls_token"].expand(b, -1, -1), x], dim=1)
    assert gh == gw
    x = x + pos_embed_reference(sd["backbone.pos_embed"], gh)
    if num_registers:
        x = torch.cat([x[:, :1], sd["backbone.register_tokens"].expand(b, -1, -1), x[:, 1:]], dim=1)
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("backbone.blocks."))
    for n in range(depth):
        p = f"backbone.blocks.{n}"
        t, d = x.shape[1], x.shape[2]
        qkv = _linear(_layer_norm(x, sd, p + ".norm1"), sd, p + ".attn.qkv").reshape(b, t, 3, num_heads, -1)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // num_heads), dim=-1)
        a = _linear((attn @ v).transpose(1, 2).reshape(b, t, d), sd, p + ".attn.proj")
        if p + ".adapter1.D_fc1.weight" in sd:
            a = a + _adapter(a, sd, p + ".adapter1")
        x = x + sd[p + ".ls1.gamma"] * a
        hn = _layer_norm(x, sd, p + ".norm2")
        f = _linear(F.gelu(_linear(hn, sd, p + ".mlp.fc1")), sd, p + ".mlp.fc2")
        if p + ".adapter2.D_fc1.weight" in sd:
            f = f + 0.2 * _adapter(hn, sd, p + ".adapter2")
        x = x + sd[p + ".ls2.gamma"] * f
    tokens = _layer_norm(x, sd, "backbone.norm")[:, 1 + num_registers :]
    grid = tokens.reshape(b, gh, gw, -1)
    # Global: L2 per position, GeM over the grid, L2.
    pos = F.normalize(grid, dim=-1).clamp(min=1e-6)
    p_gem = sd.get("aggregation.1.p", torch.tensor([3.0]))
    gem = pos.pow(p_gem).mean(dim=(1, 2)).pow(1 / p_gem)
    global_desc = F.normalize(gem, dim=-1)
    local = None
    if "LocalAdapt.upconv1.weight" in sd:
        m = grid.permute(0, 3, 1, 2)
        m = F.conv_transpose2d(m, sd["LocalAdapt.upconv1.weight"], sd["LocalAdapt.upconv1.bias"], 2, 1)
        m = F.conv_transpose2d(
            torch.relu(m), sd["LocalAdapt.upconv2.weight"], sd["LocalAdapt.upconv2.bias"], 2, 1
        )
        local = F.normalize(m.permute(0, 2, 3, 1), dim=-1)
    return global_desc, local, grid


def mnn_count_reference(query: np.ndarray, cand: np.ndarray) -> int:
    """Spec section 5 literally: full similarity matrix, two argmaxes, the mutual check."""
    q = np.asarray(query, np.float64).reshape(-1, query.shape[-1])
    c = np.asarray(cand, np.float64).reshape(-1, cand.shape[-1])
    sim = c @ q.T  # (L_c, L_q)
    best_c_of_q = sim.argmax(axis=0)  # np.argmax returns the first maximum, as torch does
    best_q_of_c = sim.argmax(axis=1)
    return int(sum(best_q_of_c[best_c_of_q[j]] == j for j in range(q.shape[0])))
