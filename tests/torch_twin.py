"""A PyTorch twin of tinyvit's ViT, written with torch ops and autograd, keyed like timm.

It is the oracle of the whole-model tests: same state dict in, logits and every
gradient out. Pre-norm blocks follow timm's ``Block``; post-norm blocks are PyTorch's
own ``nn.TransformerEncoderLayer`` (the tutorial's), loaded with the same weights.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def torch_params(state_dict: dict, dtype=torch.float64) -> dict:
    return {k: torch.tensor(np.asarray(v), dtype=dtype, requires_grad=True) for k, v in state_dict.items()}


# ---- 2D RoPE as the RoPE-ViT paper writes it (Heo et al. 2024, its reference code's structure):
# positions t_x = n mod W, t_y = n div W; each head's pairs as complex numbers, multiplied by
# cis(angle) = torch.polar(1, angle); the class token (the first T tokens) is not rotated.
def rope_t_xy(end_x, end_y, ref=None):
    """Patch coordinates; with ``ref = (ref_y, ref_x)`` scaled to that grid (EVA's t / size * ref)."""
    t = torch.arange(end_x * end_y, dtype=torch.float64)
    t_x, t_y = t % end_x, torch.div(t, end_x, rounding_mode="floor")
    if ref is not None:
        t_x, t_y = t_x / end_x * ref[1], t_y / end_y * ref[0]
    return t_x, t_y


def rope_axial_cis(head_dim, end_x, end_y, theta=100.0, ref=None):
    """(Np, hs/2) complex: x angles on the first hs/4 pairs, y angles on the rest."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].to(torch.float64) / head_dim))
    t_x, t_y = rope_t_xy(end_x, end_y, ref)
    fx, fy = torch.outer(t_x, freqs), torch.outer(t_y, freqs)
    return torch.cat([torch.polar(torch.ones_like(fx), fx), torch.polar(torch.ones_like(fy), fy)], dim=-1)


def rope_mixed_cis(freqs, end_x, end_y, heads, ref=None):
    """freqs (2, depth, heads * hs/2) -> (depth, heads, Np, hs/2) complex, differentiable in freqs."""
    t_x, t_y = rope_t_xy(end_x, end_y, ref)
    n, depth = t_x.shape[0], freqs.shape[1]
    fx = (t_x.unsqueeze(-1) @ freqs[0].unsqueeze(-2)).view(depth, n, heads, -1).permute(0, 2, 1, 3)
    fy = (t_y.unsqueeze(-1) @ freqs[1].unsqueeze(-2)).view(depth, n, heads, -1).permute(0, 2, 1, 3)
    angles = fx + fy
    return torch.polar(torch.ones_like(angles), angles)


def rope_apply(x, cis):
    """x (B, NH, Np, hs) real, cis (Np, hs/2) or (NH, Np, hs/2) complex -> x turned, (B, NH, Np, hs)."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * cis).flatten(3)


def torch_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads, attn_mask=None, attn_p=0.0, rope_cis=None,
                    num_prefix=1):
    """timm's Attention; ``attn_mask`` (bool keep-mask) applies inverted dropout to the probabilities;
    ``rope_cis`` turns q and k past the ``num_prefix`` tokens (RoPE-ViT's Attention)."""
    B, N, D = x.shape
    hs = D // heads
    qkv = F.linear(x, qkv_w, qkv_b).reshape(B, N, 3, heads, hs).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if rope_cis is not None:
        t = num_prefix
        q = torch.cat([q[:, :, :t], rope_apply(q[:, :, t:], rope_cis)], dim=2)
        k = torch.cat([k[:, :, :t], rope_apply(k[:, :, t:], rope_cis)], dim=2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
    att = att.softmax(dim=-1)
    if attn_mask is not None:
        att = att * attn_mask / (1.0 - attn_p)
    y = (att @ v).transpose(1, 2).reshape(B, N, D)
    return F.linear(y, proj_w, proj_b)


def swin_relative_position_index(M):
    """Swin's ``relative_position_index`` buffer (timm ``swin_transformer.get_relative_position_index``)."""
    coords = torch.stack(torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")).flatten(1)  # (2, M*M)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()  # (M*M, M*M, 2)
    rel[:, :, 0] += M - 1
    rel[:, :, 1] += M - 1
    rel[:, :, 0] *= 2 * M - 1
    return rel.sum(-1)


def swin_shift_mask(H, W, M, s):
    """Swin's ``attn_mask`` for a shifted grid: (nW, M*M, M*M), -100 between different regions."""
    img = torch.zeros((1, H, W, 1))
    cnt = 0
    for h in (slice(0, -M), slice(-M, -s), slice(-s, None)):
        for w in (slice(0, -M), slice(-M, -s), slice(-s, None)):
            img[:, h, w, :] = cnt
            cnt += 1
    mw = window_partition(img, M).view(-1, M * M)
    mask = mw.unsqueeze(1) - mw.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def window_partition(x, M):
    """Swin: (B, H, W, C) -> (B * nW, M, M, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // M, M, W // M, M, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, M, M, C)


def window_reverse(windows, M, H, W):
    """Swin: (B * nW, M, M, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // M, W // M, M, M, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def torch_window_attention(x, qkv_w, qkv_b, proj_w, proj_b, table, heads, spec, attn_masks=None, attn_p=0.0,
                           rope_cis=None):
    """Swin's W-MSA / SW-MSA (timm's ``SwinTransformerBlock`` + ``WindowAttention``, the same steps:
    roll, window_partition, q*scale @ k^T, + relative_position_bias, + mask, softmax, @ v,
    window_reverse, roll back) on the patch tokens of a ViT, with the prefix tokens as Vision
    Longformer's global tokens: they attend to all tokens, and every window also attends to them.
    ``attn_masks``: (window rows (B, NH, nW, S, T + S), prefix rows (B, NH, T, N)) keep-masks;
    ``rope_cis`` turns q and k past the prefix tokens (2D RoPE, as torch_attention)."""
    B, N, D = x.shape
    hs, T, (H, W), M, s = D // heads, spec.prefix, spec.grid, spec.size, spec.shift
    qkv = F.linear(x, qkv_w, qkv_b).reshape(B, N, 3, heads, hs).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, NH, N, hs)
    if rope_cis is not None:  # 2D RoPE on the patch tokens' q and k, before the windows
        q = torch.cat([q[:, :, :T], rope_apply(q[:, :, T:], rope_cis)], dim=2)
        k = torch.cat([k[:, :, :T], rope_apply(k[:, :, T:], rope_cis)], dim=2)
    scale = hs ** -0.5
    # prefix (global) rows: ordinary attention over every token
    a_pre = ((q[:, :, :T] * scale) @ k.transpose(-2, -1)).softmax(-1)
    if attn_masks is not None:
        a_pre = a_pre * attn_masks[1] / (1.0 - attn_p)
    y_pre = a_pre @ v  # (B, NH, T, hs)

    def windows(t):  # (B, NH, Np, hs) -> (B*nW, NH, S, hs), Swin's layout
        t = t.permute(0, 2, 1, 3).reshape(B, H, W, heads * hs)
        if s:
            t = torch.roll(t, shifts=(-s, -s), dims=(1, 2))
        w = window_partition(t, M).view(-1, M * M, heads, hs)
        return w.permute(0, 2, 1, 3)

    qw, kw, vw = windows(q[:, :, T:]), windows(k[:, :, T:]), windows(v[:, :, T:])
    nW = qw.shape[0] // B
    attn = (qw * scale) @ kw.transpose(-2, -1)  # (B*nW, NH, S, S)
    bias = table[swin_relative_position_index(M).view(-1)].view(M * M, M * M, -1).permute(2, 0, 1)
    attn = attn + bias.unsqueeze(0)
    if s:
        attn = attn.view(B, nW, heads, M * M, M * M) + swin_shift_mask(H, W, M, s).to(attn).unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, M * M, M * M)
    kp = k[:, :, :T].unsqueeze(1).expand(B, nW, heads, T, hs).reshape(B * nW, heads, T, hs)
    vp = v[:, :, :T].unsqueeze(1).expand(B, nW, heads, T, hs).reshape(B * nW, heads, T, hs)
    glob = (qw * scale) @ kp.transpose(-2, -1)  # (B*nW, NH, S, T)
    a = torch.cat([glob, attn], dim=-1).softmax(-1)
    if attn_masks is not None:
        keep = attn_masks[0].permute(0, 2, 1, 3, 4).reshape(B * nW, heads, M * M, T + M * M)
        a = a * keep / (1.0 - attn_p)
    yw = a @ torch.cat([vp, vw], dim=2)  # (B*nW, NH, S, hs)
    yw = window_reverse(yw.permute(0, 2, 1, 3).reshape(-1, M, M, heads * hs), M, H, W)  # (B, H, W, D)
    if s:
        yw = torch.roll(yw, shifts=(s, s), dims=(1, 2))
    y = torch.cat([y_pre.transpose(1, 2).reshape(B, T, D), yw.reshape(B, H * W, D)], dim=1)
    return F.linear(y, proj_w, proj_b)


def _drop(x, mask, p):
    return x if mask is None else x * mask / (1.0 - p)


def torch_block(x, p, prefix, heads, eps, norm_first, approximate="none", masks=None, dropout=0.0,
                attn_dropout=0.0, drop_path=0.0, rope_cis=None, num_prefix=1, window=None):
    g = lambda k: p.get(prefix + k)  # noqa: E731
    m = masks or {}

    def attn(a):
        if window is not None:
            a = torch_window_attention(a, g("attn.qkv.weight"), g("attn.qkv.bias"), g("attn.proj.weight"),
                                       g("attn.proj.bias"), g("attn.relative_position_bias_table"), heads, window,
                                       m.get("attn"), attn_dropout, rope_cis)
        else:
            a = torch_attention(a, g("attn.qkv.weight"), g("attn.qkv.bias"), g("attn.proj.weight"),
                                g("attn.proj.bias"), heads, m.get("attn"), attn_dropout, rope_cis, num_prefix)
        return _drop(_drop(a, m.get("proj"), dropout), m.get("path1"), drop_path)

    def mlp(h):
        h = F.gelu(F.linear(h, g("mlp.fc1.weight"), g("mlp.fc1.bias")), approximate=approximate)
        h = _drop(h, m.get("mlp_hidden"), dropout)
        h = _drop(F.linear(h, g("mlp.fc2.weight"), g("mlp.fc2.bias")), m.get("mlp_out"), dropout)
        return _drop(h, m.get("path2"), drop_path)

    ln = lambda t, n: F.layer_norm(t, (t.shape[-1],), g(n + ".weight"), g(n + ".bias"), eps)  # noqa: E731
    if norm_first:
        x = x + attn(ln(x, "norm1"))
        return x + mlp(ln(x, "norm2"))
    x = ln(x + attn(x), "norm1")
    return ln(x + mlp(x), "norm2")


def torch_vit_forward(x, p, config, masks=None, fixed_pos=None):
    """``x: (B, C, H, W)`` torch tensor, ``p``: torch params -> (cls_logits, dist_logits | None)."""
    c = config
    masks = masks or {}
    x = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=c.patch_size)
    x = x.flatten(2).transpose(1, 2)  # (B, Np, D)
    B = x.shape[0]
    prefix = [p["cls_token"].expand(B, -1, -1)]
    if c.distilled:
        prefix.append(p["dist_token"].expand(B, -1, -1))
    x = torch.cat(prefix + [x], dim=1)
    gh, gw = c.grid
    cis = [None] * c.depth
    if c.pos_embed == "rope_axial":
        cis = [rope_axial_cis(c.dim // c.heads, gw, gh, c.rope_theta, c.rope_ref_grid)] * c.depth
    elif c.pos_embed == "rope_mixed":
        cis = rope_mixed_cis(p["rope.freqs"].reshape(2, c.depth, -1), gw, gh, c.heads, c.rope_ref_grid)
    else:
        x = x + (p["pos_embed"] if c.pos_embed == "learned" else fixed_pos)
    x = _drop(x, masks.get("emb"), c.emb_dropout)
    for i, dp in enumerate(c.drop_path_rates()):
        bm = masks.get(f"blocks.{i}")
        bm = {k: v for k, v in bm._asdict().items() if v is not None} if bm is not None else None
        x = torch_block(x, p, f"blocks.{i}.", c.heads, c.layer_norm_eps, c.norm_first, c.gelu, bm,
                        c.dropout, c.attn_dropout, dp, cis[i], c.num_prefix_tokens, c.window_spec(i))
    T = c.num_prefix_tokens
    if c.pool == "cls":
        x = F.layer_norm(x, (c.dim,), p["norm.weight"], p["norm.bias"], c.layer_norm_eps)
        cls = F.linear(x[:, 0], p["head.weight"], p["head.bias"])
        dist = F.linear(x[:, 1], p["head_dist.weight"], p["head_dist.bias"]) if c.distilled else None
        return cls, dist
    pooled = F.layer_norm(x[:, T:].mean(dim=1), (c.dim,), p["fc_norm.weight"], p["fc_norm.bias"], c.layer_norm_eps)
    return F.linear(pooled, p["head.weight"], p["head.bias"]), None
