"""The PyTorch side of the benchmarks: the same ViT in eager PyTorch, keyed like timm.

Pre-norm blocks as timm's ``Block`` with the attention written out (``q @ k^T``, softmax,
``@ v``, no fused ``scaled_dot_product_attention``), so both engines do the same
arithmetic. Weights come from a tinyvit model's ``state_dict()``, so outputs can be
compared before anything is timed.
"""
from __future__ import annotations

import math

import numpy as np


def import_torch():
    """PyTorch, or a RuntimeError saying why it cannot be used (an optional dependency)."""
    try:
        import torch
    except ImportError as exc:
        raise RuntimeError("PyTorch is not installed (pip install 'tinyvit[test]' brings torch==2.13.0)") from exc
    return torch


def torch_params(state_dict: dict, torch, device="cpu", dtype="float32") -> dict:
    tdtype = getattr(torch, dtype)
    return {k: torch.tensor(np.asarray(v), dtype=tdtype, device=device).requires_grad_(True)
            for k, v in state_dict.items()}


def rope(x, angles, num_prefix, torch):
    """2D RoPE in eager PyTorch: ``x (B, NH, N, hs)`` pairs turned by ``angles (NH or 1, N - T, hs/2)``
    past the first ``num_prefix`` tokens (interleaved pairs, as tinyvit and the RoPE-ViT paper)."""
    t = num_prefix
    a, b = x[:, :, t:, 0::2], x[:, :, t:, 1::2]
    c, s = torch.cos(angles), torch.sin(angles)
    turned = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    return torch.cat([x[:, :, :t], turned], dim=2)


def attention(x, p, prefix, heads, torch, rope_angles=None):
    F = torch.nn.functional
    batch, tokens, dim = x.shape
    hs = dim // heads
    qkv = F.linear(x, p[prefix + "attn.qkv.weight"], p.get(prefix + "attn.qkv.bias"))  # (B, N, 3D)
    qkv = qkv.reshape(batch, tokens, 3, heads, hs).permute(2, 0, 3, 1, 4)  # (3, B, NH, N, hs)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if rope_angles is not None:
        q, k = rope(q, rope_angles, 1, torch), rope(k, rope_angles, 1, torch)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, NH, N, N)
    att = att.softmax(dim=-1)
    y = (att @ v).transpose(1, 2).reshape(batch, tokens, dim)  # (B, N, D)
    return F.linear(y, p[prefix + "attn.proj.weight"], p[prefix + "attn.proj.bias"])


def mlp(x, p, prefix, approximate, torch):
    F = torch.nn.functional
    h = F.gelu(F.linear(x, p[prefix + "mlp.fc1.weight"], p[prefix + "mlp.fc1.bias"]), approximate=approximate)
    return F.linear(h, p[prefix + "mlp.fc2.weight"], p[prefix + "mlp.fc2.bias"])


def block(x, p, prefix, heads, eps, approximate, torch):
    F = torch.nn.functional
    dim = x.shape[-1]
    ln = lambda t, n: F.layer_norm(t, (dim,), p[prefix + n + ".weight"], p[prefix + n + ".bias"], eps)  # noqa: E731
    x = x + attention(ln(x, "norm1"), p, prefix, heads, torch)
    return x + mlp(ln(x, "norm2"), p, prefix, approximate, torch)


def vit_forward(x, p, config, torch):
    """``x: (B, C, H, W)`` -> logits ``(B, K)``; pre-norm, learned positions, no dropout."""
    F = torch.nn.functional
    c = config
    if not c.norm_first or c.distilled or c.pos_embed != "learned":
        raise ValueError("the PyTorch benchmark model covers pre-norm, learned-position, non-distilled ViTs")
    x = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=c.patch_size)
    x = x.flatten(2).transpose(1, 2)  # (B, Np, D)
    x = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + p["pos_embed"]  # (B, N, D)
    for i in range(c.depth):
        x = block(x, p, f"blocks.{i}.", c.heads, c.layer_norm_eps, c.gelu, torch)
    if c.pool == "cls":
        x = F.layer_norm(x, (c.dim,), p["norm.weight"], p["norm.bias"], c.layer_norm_eps)[:, 0]
    else:
        x = F.layer_norm(x[:, 1:].mean(dim=1), (c.dim,), p["fc_norm.weight"], p["fc_norm.bias"], c.layer_norm_eps)
    return F.linear(x, p["head.weight"], p["head.bias"])
