"""The registry behind ``tinyvit gradcheck``: one :class:`Case` per layer (and the whole model).

A case is a name, a ``build(backend, dtype)`` that returns the keyword arguments of
:func:`~tinyvit.gradcheck.check_backward` (``forward``, ``backward``, ``args``, ``names`` and
usually ``torch_forward``), the ``*_backward`` functions of ``tinyvit/layers/`` it exercises
(``covers``, as ``"module.function"``), and the mode the command runs it in by default.

**Adding a layer**: write its forward and backward in ``tinyvit/layers/``, then append a row
to :data:`CASES` below that covers the new backward. ``tests/test_gradcheck.py`` fails,
naming the function, while any ``*_backward`` defined in ``tinyvit/layers/`` is in no case's
``covers``. Sizes stay tiny (full mode costs two forwards per coordinate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..layers import kernels
from ..layers.attention import attention_backward, attention_forward, softmax_backward, softmax_forward
from ..layers.block import BLOCK_KEYS, BlockMasks, block_backward, block_forward
from ..layers.dropout import drop_path_backward, drop_path_forward, dropout_backward, dropout_forward, \
    patch_dropout_backward, patch_dropout_forward
from ..layers.flash_attention import draw_dropout_seed, dropout_keep_mask, flash_attention_backward, \
    flash_attention_forward, flash_core_backward, flash_core_forward
from ..layers.gates import head_gate_backward, head_gate_forward
from ..layers.gelu import gelu_backward, gelu_forward
from ..layers.head import mean_pool_forward, pool_backward, token_pool_forward
from ..layers.layernorm import layernorm_backward, layernorm_forward
from ..layers.linear import linear_backward, linear_forward
from ..layers.loss import cross_entropy_backward, cross_entropy_forward
from ..layers.mlp import mlp_backward, mlp_forward
from ..layers.quant import FakeQuantWeight, fake_quant_backward, fake_quant_forward, quant_linear_backward, \
    quant_linear_forward
from ..layers.patch_embed import patch_embed_backward, patch_embed_forward, patchify_backward, patchify_forward
from ..layers.rope import rope_angles_backward, rope_angles_forward, rope_backward, rope_forward, rope_positions
from ..layers.tome import tome_match, tome_merge_backward, tome_merge_forward, weighted_mean_pool_backward, \
    weighted_mean_pool_forward
from ..layers.window_attention import (WindowSpec, relative_bias_backward, relative_bias_forward,
                                       relative_position_index, shift_mask, window_attention_backward,
                                       window_attention_forward, window_core_backward, window_core_forward,
                                       window_token_index)
from ..layers.tokens import add_pos_embed_backward, add_pos_embed_forward, prepend_tokens_backward, \
    prepend_tokens_forward

B, N, D, NH, F = 2, 5, 8, 2, 12  # batch, tokens, width, heads, MLP hidden: tiny, so full mode is cheap


class Skip(Exception):
    """Raised by a case's ``build`` when the case cannot run here (the reason is printed)."""


@dataclass(frozen=True)
class Case:
    """One row of ``tinyvit gradcheck``.

    ``build(backend, dtype) -> dict`` of :func:`check_backward` keyword arguments;
    ``covers``: the ``"module.fn_backward"`` names of ``tinyvit/layers/`` it exercises;
    ``mode``: the command's default mode for it; ``dtype``: a fixed dtype (a float32 kernel).
    """

    name: str
    build: Callable
    covers: tuple = ()
    mode: str = "full"
    dtype: str | None = None
    about: str = ""


def _rand(backend, dtype, seed):
    """``rand(*shape, scale=1, shift=0)``: seeded normal arrays on ``backend`` in ``dtype``."""
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return backend.asarray(rng.standard_normal(shape) * scale + shift, dtype=dtype)

    rand.mask = lambda *shape, keep=0.8: backend.asarray(rng.random(shape) < keep)  # bool keep-mask
    rand.host = rng
    return rand


def _torch():
    import torch
    return torch


def _t(mask):
    """A keep-mask (any backend) as a float64 torch tensor, for the PyTorch references."""
    from ..backend import to_host
    return _torch().tensor(np.asarray(to_host(mask), dtype=np.float64))


# ------------------------------------------------------------------------------ torch twins
def _torch_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads, mask=None, p=0.0):
    F_ = _torch().nn.functional
    batch, tokens, dim = x.shape
    hs = dim // heads
    qkv = F_.linear(x, qkv_w, qkv_b).reshape(batch, tokens, 3, heads, hs).permute(2, 0, 3, 1, 4)
    att = (qkv[0] @ qkv[1].transpose(-2, -1) / math.sqrt(hs)).softmax(dim=-1)
    if mask is not None:
        att = att * _t(mask) / (1.0 - p)
    return F_.linear((att @ qkv[2]).transpose(1, 2).reshape(batch, tokens, dim), proj_w, proj_b)


def _drop(x, mask, p):
    return x if mask is None else x * _t(mask) / (1.0 - p)


def _torch_mlp(x, w1, b1, w2, b2, approximate="none", masks=(None, None), p=0.0):
    F_ = _torch().nn.functional
    h = _drop(F_.gelu(F_.linear(x, w1, b1), approximate=approximate), masks[0], p)
    return _drop(F_.linear(h, w2, b2), masks[1], p)


def _torch_block(x, params, heads, eps, norm_first, approximate, m: BlockMasks, p, attn_p, path_p):
    F_ = _torch().nn.functional
    g = params.get

    def attn(a):
        a = _torch_attention(a, g("attn.qkv.weight"), g("attn.qkv.bias"), g("attn.proj.weight"),
                             g("attn.proj.bias"), heads, m.attn, attn_p)
        return _drop(_drop(a, m.proj, p), m.path1, path_p)

    def mlp(h):
        h = _torch_mlp(h, g("mlp.fc1.weight"), g("mlp.fc1.bias"), g("mlp.fc2.weight"), g("mlp.fc2.bias"),
                       approximate, (m.mlp_hidden, m.mlp_out), p)
        return _drop(h, m.path2, path_p)

    ln = lambda t, n: F_.layer_norm(t, (t.shape[-1],), g(n + ".weight"), g(n + ".bias"), eps)  # noqa: E731
    if norm_first:
        x = x + attn(ln(x, "norm1"))
        return x + mlp(ln(x, "norm2"))
    x = ln(x + attn(x), "norm1")
    return ln(x + mlp(x), "norm2")


# ------------------------------------------------------------------------------ the cases
def _linear(backend, dtype, bias=True):
    r = _rand(backend, dtype, 1)
    args = [r(B, N, D), r(F, D), r(F)]
    if bias:
        return dict(forward=linear_forward, backward=linear_backward, args=args, names=["x", "w", "b"],
                    torch_forward=lambda x, w, b: _torch().nn.functional.linear(x, w, b))
    return dict(forward=lambda x, w: linear_forward(x, w, None), backward=lambda d, c: linear_backward(d, c)[:2],
                args=args[:2], names=["x", "w"], torch_forward=lambda x, w: _torch().nn.functional.linear(x, w))


def _patchify(backend, dtype):
    r = _rand(backend, dtype, 2)
    return dict(forward=lambda x: patchify_forward(x, 2), backward=patchify_backward, args=[r(2, 3, 4, 6)],
                names=["x"],
                torch_forward=lambda x: x.reshape(2, 3, 2, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 6, 12))


def _patch_embed(backend, dtype):
    r = _rand(backend, dtype, 3)

    def torch_forward(x, w, b):
        return _torch().nn.functional.conv2d(x, w, b, stride=w.shape[-1]).flatten(2).transpose(1, 2)

    return dict(forward=patch_embed_forward, backward=patch_embed_backward,
                args=[r(2, 3, 4, 6), r(D, 3, 2, 2), r(D)], names=["x", "w", "b"], torch_forward=torch_forward)


def _cls_token(backend, dtype):
    r = _rand(backend, dtype, 4)

    def torch_forward(x, cls, dist):
        torch = _torch()
        return torch.cat([cls.expand(x.shape[0], 1, -1), dist.expand(x.shape[0], 1, -1), x], dim=1)

    return dict(forward=prepend_tokens_forward, backward=prepend_tokens_backward,
                args=[r(B, N, D), r(1, 1, D), r(1, 1, D)], names=["x", "cls_token", "dist_token"],
                torch_forward=torch_forward)


def _pos_embed(backend, dtype):
    r = _rand(backend, dtype, 5)
    return dict(forward=add_pos_embed_forward, backward=add_pos_embed_backward, args=[r(B, N, D), r(1, N, D)],
                names=["x", "pos_embed"], torch_forward=lambda x, pos: x + pos)


def _layernorm(backend, dtype):
    r = _rand(backend, dtype, 6)
    return dict(forward=lambda x, w, b: layernorm_forward(x, w, b, 1e-6), backward=layernorm_backward,
                args=[r(B, N, D, scale=3.0, shift=1.0), r(D, shift=1.0), r(D)], names=["x", "w", "b"],
                torch_forward=lambda x, w, b: _torch().nn.functional.layer_norm(x, (D,), w, b, 1e-6))


def _gelu(approximate, kernel=False):
    def build(backend, dtype):
        r = _rand(backend, dtype, 7)
        x = r(B, N, F, scale=2.0)
        backward = gelu_backward
        if kernel:
            if kernels.gelu_backward(x, x, approximate) is None:
                raise Skip(f"no fused float32 GELU kernel for {backend.name} here (TINYVIT_FUSED=0, or a backend "
                           f"other than NumPy/CuPy)")

            def backward(dout, cache):  # the fused kernel itself, not the fallback
                return kernels.gelu_backward(dout, cache.x, cache.approximate)

        return dict(forward=lambda x: gelu_forward(x, approximate), backward=backward, args=[x], names=["x"],
                    torch_forward=lambda x: _torch().nn.functional.gelu(x, approximate=approximate))
    return build


def _layernorm_kernel(backend, dtype):
    """The compiled float32 LayerNorm backward (numba), fed by the layer's own float32 forward."""
    spec = _layernorm(backend, dtype)
    x, w, _ = spec["args"]
    if kernels.layernorm_backward(x, x, x[..., :1], w) is None:
        raise Skip(f"no compiled float32 LayerNorm kernel here (path: {kernels.path(backend.xp, dtype)}; "
                   f"it needs numba on NumPy)")

    def backward(dout, cache):
        return kernels.layernorm_backward(dout, cache.x_hat, cache.rstd, cache.w)

    return dict(spec, backward=backward)


def _softmax_kernel(backend, dtype):
    """The compiled float32 softmax backward (numba)."""
    spec = _softmax(backend, dtype)
    x = spec["args"][0]
    if kernels.softmax_backward(x, x) is None:
        raise Skip(f"no compiled float32 softmax kernel here (path: {kernels.path(backend.xp, dtype)}; "
                   f"it needs numba on NumPy)")
    return dict(spec, backward=lambda dout, cache: kernels.softmax_backward(dout, cache.out))


def _dropout(backend, dtype):
    r = _rand(backend, dtype, 8)
    mask = r.mask(B, N, D, keep=0.7)
    return dict(forward=lambda x: dropout_forward(x, 0.3, True, mask=mask), backward=dropout_backward,
                args=[r(B, N, D)], names=["x"], torch_forward=lambda x: _drop(x, mask, 0.3))


def _drop_path(backend, dtype):
    r = _rand(backend, dtype, 9)
    mask = backend.asarray(np.array([True, False, True]).reshape(3, 1, 1))
    return dict(forward=lambda x: drop_path_forward(x, 0.25, True, mask=mask), backward=drop_path_backward,
                args=[r(3, N, D)], names=["x"], torch_forward=lambda x: _drop(x, mask, 0.25))


def _softmax(backend, dtype):
    r = _rand(backend, dtype, 10)
    return dict(forward=softmax_forward, backward=softmax_backward, args=[r(B, NH, N, N, scale=3.0)], names=["x"],
                torch_forward=lambda x: x.softmax(dim=-1))


def _attention(backend, dtype):
    r = _rand(backend, dtype, 11)
    mask = r.mask(B, NH, N, N, keep=0.8)
    args = [r(B, N, D), r(3 * D, D, scale=0.5), r(3 * D), r(D, D), r(D)]
    return dict(forward=lambda *a: attention_forward(*a, NH, 0.2, True, attn_mask=mask), backward=attention_backward,
                args=args, names=["x", "qkv_w", "qkv_b", "proj_w", "proj_b"],
                torch_forward=lambda *a: _torch_attention(*a, NH, mask, 0.2))


def _flash_core(backend, dtype):
    """The tiled core alone, 2x2 tiles over 5 tokens (a ragged last tile), an injected dropout mask."""
    r = _rand(backend, dtype, 18)
    mask = r.mask(B, NH, N, N, keep=0.8)
    scale = 1.0 / math.sqrt(D // NH)

    def torch_forward(q, k, v):
        return _drop((q @ k.transpose(-2, -1) * scale).softmax(dim=-1), mask, 0.2) @ v

    return dict(forward=lambda q, k, v: flash_core_forward(q, k, v, scale, 2, 0.2, True, attn_mask=mask),
                backward=flash_core_backward, args=[r(B, NH, N, D // NH) for _ in range(3)], names=["q", "k", "v"],
                torch_forward=torch_forward)


def _flash_attention(backend, dtype):
    """Flash multi-head attention, 2x2 tiles, dropout regenerated from a seeded generator's seed."""
    r = _rand(backend, dtype, 19)
    args = [r(B, N, D), r(3 * D, D, scale=0.5), r(3 * D), r(D, D), r(D)]

    def forward(*a):  # a fresh generator per call: the same seed, so the same mask, every call
        return flash_attention_forward(*a, NH, 2, 0.2, True, backend.rng(5))

    def torch_forward(*a):
        mask = dropout_keep_mask(draw_dropout_seed(backend.rng(5)), (B, NH, N, N), 0.2)
        return _torch_attention(*a, NH, mask, 0.2)

    return dict(forward=forward, backward=flash_attention_backward, args=args,
                names=["x", "qkv_w", "qkv_b", "proj_w", "proj_b"], torch_forward=torch_forward)


WINDOW = WindowSpec((4, 4), 1, 2, 1)  # a 4x4 grid, a class token, 2x2 windows shifted by 1: N = 17


def _dense_window_bias(spec: WindowSpec, table):
    """Windowed attention written densely, for the PyTorch reference: an ``(NH, N, N)`` additive
    term that is the relative bias + Swin's -100 shift mask inside each window, 0 on the pairs with
    a prefix token, and -inf on every pair the windows keep apart."""
    torch = _torch()
    t, m = spec.prefix, spec.size
    n = t + spec.grid[0] * spec.grid[1]
    slots = window_token_index(spec)  # (nW, S): the token in each window slot
    rows = np.zeros((n, n), dtype=np.int64)
    inside = np.zeros((n, n), dtype=bool)
    extra = np.full((n, n), -np.inf)
    extra[:t, :] = 0.0  # prefix rows attend to everything
    extra[:, :t] = 0.0  # everything attends to the prefix tokens
    index = relative_position_index(m)
    masks = shift_mask(spec.grid, m, spec.shift) if spec.shift else np.zeros((len(slots), m * m, m * m))
    for w, tokens in enumerate(slots):
        rows[np.ix_(tokens, tokens)] = index
        inside[np.ix_(tokens, tokens)] = True
        extra[np.ix_(tokens, tokens)] = masks[w]
    bias = table[torch.tensor(rows)].permute(2, 0, 1) * torch.tensor(inside, dtype=table.dtype)  # (NH, N, N)
    return bias + torch.tensor(extra, dtype=table.dtype)


def _window_core(backend, dtype):
    """Shifted 2x2 windows over a 4x4 grid with a class token: q, k, v and the bias table, against
    a dense PyTorch softmax with the same pairs allowed (a different formulation of the same map)."""
    r = _rand(backend, dtype, 22)
    hs = D // NH
    scale = 1.0 / math.sqrt(hs)
    n = 1 + 16

    def torch_forward(q, k, v, table):
        return ((q @ k.transpose(-2, -1)) * scale + _dense_window_bias(WINDOW, table)).softmax(dim=-1) @ v

    return dict(forward=lambda q, k, v, table: window_core_forward(q, k, v, table, scale, WINDOW),
                backward=window_core_backward, args=[r(1, NH, n, hs) for _ in range(3)] + [r(9, NH)],
                names=["q", "k", "v", "table"], torch_forward=torch_forward)


def _window_attention(backend, dtype):
    """Windowed multi-head attention (W-MSA with the qkv and output projections), unshifted."""
    r = _rand(backend, dtype, 23)
    spec = WindowSpec((4, 4), 1, 2, 0)
    args = [r(1, 17, D), r(3 * D, D, scale=0.5), r(3 * D), r(D, D), r(D), r(9, NH)]

    def torch_forward(x, qkv_w, qkv_b, proj_w, proj_b, table):
        F_ = _torch().nn.functional
        hs = D // NH
        qkv = F_.linear(x, qkv_w, qkv_b).reshape(1, 17, 3, NH, hs).permute(2, 0, 3, 1, 4)
        att = (qkv[0] @ qkv[1].transpose(-2, -1) / math.sqrt(hs) + _dense_window_bias(spec, table)).softmax(-1)
        return F_.linear((att @ qkv[2]).transpose(1, 2).reshape(1, 17, D), proj_w, proj_b)

    return dict(forward=lambda *a: window_attention_forward(*a[:5], a[5], NH, spec),
                backward=window_attention_backward, args=args,
                names=["x", "qkv_w", "qkv_b", "proj_w", "proj_b", "table"], torch_forward=torch_forward)


def _relative_bias(backend, dtype):
    """Swin's relative position bias: a gather from the ((2M-1)^2, NH) table; its backward a scatter-add."""
    r = _rand(backend, dtype, 24)
    index = relative_position_index(3)

    def torch_forward(table):
        return table[_torch().tensor(index.reshape(-1))].reshape(9, 9, NH).permute(2, 0, 1)

    return dict(forward=lambda table: relative_bias_forward(table, 3), backward=relative_bias_backward,
                args=[r(25, NH)], names=["table"], torch_forward=torch_forward)


def _torch_rope(x, angles, num_prefix):
    torch = _torch()
    t = num_prefix
    a, b = x[:, :, t:, 0::2], x[:, :, t:, 1::2]
    c, s = torch.cos(angles), torch.sin(angles)
    turned = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)  # pairs interleaved again
    return torch.cat([x[:, :, :t], turned], dim=2)


def _rope(backend, dtype):
    """2D RoPE on a (B, NH, 1 + 2*3, hs) tensor: class token unturned, a per-head angle table."""
    r = _rand(backend, dtype, 20)
    return dict(forward=lambda x, angles: rope_forward(x, angles, 1), backward=rope_backward,
                args=[r(B, NH, 7, 8), r(NH, 6, 4, scale=2.0)], names=["x", "angles"],
                torch_forward=lambda x, angles: _torch_rope(x, angles, 1))


def _rope_angles(backend, dtype):
    """RoPE's angles from learnable (mixed) frequencies: theta = cx fx + cy fy on a 2x3 grid."""
    r = _rand(backend, dtype, 21)
    pos = backend.asarray(rope_positions(2, 3), dtype=dtype)

    def torch_forward(freqs):
        p = _torch().tensor(np.asarray(rope_positions(2, 3)))
        return p[0][None, :, None] * freqs[0][:, None, :] + p[1][None, :, None] * freqs[1][:, None, :]

    return dict(forward=lambda freqs: rope_angles_forward(freqs, pos), backward=rope_angles_backward,
                args=[r(2, NH, 4)], names=["freqs"], torch_forward=torch_forward)


def _patch_dropout(backend, dtype):
    """PatchDropout, timm's rule: class token kept, 3 of 6 patches chosen by argsort of fixed noise."""
    r = _rand(backend, dtype, 22)
    noise = backend.asarray(r.host.random((B, 6)), dtype=dtype)

    def torch_forward(x):  # timm's PatchDropout.forward with the same noise
        torch = _torch()
        keep = torch.argsort(_t(noise), dim=-1)[:, :3]
        patches = x[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], patches], dim=1)

    return dict(forward=lambda x: patch_dropout_forward(x, 0.5, True, 1, noise=noise),
                backward=patch_dropout_backward, args=[r(B, 7, D)], names=["x"], torch_forward=torch_forward)


def _tome_merge(backend, dtype):
    """ToMe's size-weighted merge of 9 tokens by 3, the matching fixed (a constant of the step)."""
    r = _rand(backend, dtype, 23)
    size = backend.asarray(r.host.integers(1, 4, (B, 9, 1)), dtype=dtype)
    match = tome_match(r(B, 9, 4), 3, num_prefix=1)

    def torch_forward(x):  # M (s x) / M s, with M written out as a dense (B, N', N) 0/1 matrix
        from ..backend import to_host
        torch = _torch()
        dest = np.asarray(to_host(match.dest))
        m = torch.tensor((dest[:, None, :] == np.arange(6)[None, :, None]).astype(np.float64))
        s = _t(size)
        return (m @ (x * s)) / (m @ s)

    return dict(forward=lambda x: tome_merge_forward(x, size, match), backward=tome_merge_backward,
                args=[r(B, 9, D)], names=["x"], torch_forward=torch_forward)


def _weighted_pool(backend, dtype):
    """ToMe's pool for mean-pooled models: the patch tokens weighted by their sizes."""
    r = _rand(backend, dtype, 24)
    size = backend.asarray(r.host.integers(1, 5, (B, N, 1)), dtype=dtype)

    def torch_forward(x):
        s = _t(size)[:, 1:]
        return (x[:, 1:] * s).sum(dim=1) / s.sum(dim=1)

    return dict(forward=lambda x: weighted_mean_pool_forward(x, size, 1), backward=weighted_mean_pool_backward,
                args=[r(B, N, D)], names=["x"], torch_forward=torch_forward)


def _head_gate(backend, dtype):
    """A gate on each head's output, applied as a scale on that head's columns of proj."""
    r = _rand(backend, dtype, 25)

    def torch_forward(w, gate):
        return w * gate.repeat_interleave(D // NH)[None, :]

    return dict(forward=lambda w, gate: head_gate_forward(w, gate, NH), backward=head_gate_backward,
                args=[r(D, D), r(NH, shift=1.0)], names=["proj_w", "gate"], torch_forward=torch_forward)
def _fake_quant(backend, dtype):
    """The STE's smooth surrogate ``clip(x, -127 s, 127 s)`` (``rounding=False``; the same backward as
    the rounded fake quantisation, whose true derivative is 0 almost everywhere): values inside the
    grid's range pass, values outside are clipped; none lies within 0.05 of the clip points."""
    r = _rand(backend, dtype, 31)
    x = r.host.standard_normal((B, N, D)) * 1.5
    x = np.where(np.abs(np.abs(x) - 1.27) < 0.05, x * 0.9, x)  # s = 0.01: the range is +-1.27
    scale = backend.asarray(np.float64(0.01), dtype=dtype)
    return dict(forward=lambda x: fake_quant_forward(x, scale, rounding=False), backward=fake_quant_backward,
                args=[backend.asarray(x, dtype=dtype)], names=["x"],
                torch_forward=lambda x: x.clamp(-1.27, 1.27))


def _quant_linear(backend, dtype):
    """QAT's linear layer with the smooth surrogate of its two fake quantisations (input: fixed
    per-tensor range +-1.27, some inputs clipped; weight: per-channel range max |w|, never clipped)."""
    r = _rand(backend, dtype, 32)
    x = r.host.standard_normal((B, N, D)) * 1.5
    x = np.where(np.abs(np.abs(x) - 1.27) < 0.05, x * 0.9, x)
    scale = backend.asarray(np.float64(0.01), dtype=dtype)

    def forward(x, w, b):
        return quant_linear_forward(x, FakeQuantWeight(w, scale), b, rounding=False)

    def torch_forward(x, w, b):
        return _torch().nn.functional.linear(x.clamp(-1.27, 1.27), w, b)

    return dict(forward=forward, backward=quant_linear_backward, args=[backend.asarray(x, dtype=dtype), r(F, D), r(F)],
                names=["x", "w", "b"], torch_forward=torch_forward)


def _mlp(backend, dtype):
    r = _rand(backend, dtype, 12)
    masks = (r.mask(B, N, F, keep=0.9), r.mask(B, N, D, keep=0.9))
    return dict(forward=lambda *a: mlp_forward(*a, 0.1, True, approximate="none", masks=masks),
                backward=mlp_backward, args=[r(B, N, D), r(F, D), r(F), r(D, F), r(D)],
                names=["x", "fc1_w", "fc1_b", "fc2_w", "fc2_b"],
                torch_forward=lambda *a: _torch_mlp(*a, "none", masks, 0.1))


def _block(norm_first):
    def build(backend, dtype):
        r = _rand(backend, dtype, 13 if norm_first else 14)
        shapes = {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
                  "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "norm2.weight": (D,), "norm2.bias": (D,),
                  "mlp.fc1.weight": (F, D), "mlp.fc1.bias": (F,), "mlp.fc2.weight": (D, F), "mlp.fc2.bias": (D,)}
        keys = list(BLOCK_KEYS)
        params = [r(*shapes[k], scale=0.5, shift=1.0 if k.startswith("norm") and k.endswith("weight") else 0.0)
                  for k in keys]
        masks = BlockMasks(attn=r.mask(B, NH, N, N, keep=0.9), proj=r.mask(B, N, D, keep=0.9),
                           mlp_hidden=r.mask(B, N, F, keep=0.9), mlp_out=r.mask(B, N, D, keep=0.9),
                           path1=backend.asarray(np.array([True, False]).reshape(B, 1, 1)),
                           path2=backend.asarray(np.array([True, True]).reshape(B, 1, 1)))
        approximate = "none" if norm_first else "tanh"

        def forward(x, *values):
            return block_forward(x, dict(zip(keys, values)), NH, 1e-6, norm_first, 0.1, 0.1, 0.1, approximate, True,
                                 masks=masks)

        def backward(dout, cache):
            dx, grads = block_backward(dout, cache)
            return (dx, *(grads[k] for k in keys))

        def torch_forward(x, *values):
            return _torch_block(x, dict(zip(keys, values)), NH, 1e-6, norm_first, approximate, masks, 0.1, 0.1, 0.1)

        return dict(forward=forward, backward=backward, args=[r(B, N, D)] + params, names=["x"] + keys,
                    torch_forward=torch_forward)
    return build


def _pool(kind):
    def build(backend, dtype):
        r = _rand(backend, dtype, 15)
        if kind == "cls":
            return dict(forward=lambda x: token_pool_forward(x, 0), backward=pool_backward, args=[r(B, N, D)],
                        names=["x"], torch_forward=lambda x: x[:, 0])
        return dict(forward=lambda x: mean_pool_forward(x, 2), backward=pool_backward, args=[r(B, N, D)],
                    names=["x"], torch_forward=lambda x: x[:, 2:].mean(dim=1))
    return build


def _cross_entropy(soft):
    def build(backend, dtype):
        r = _rand(backend, dtype, 16)
        K, smoothing = 5, 0.1
        if soft:
            t = r.host.random((4, K))
            targets = backend.asarray(t / t.sum(axis=1, keepdims=True), dtype=dtype)
        else:
            targets = backend.asarray(np.array([0, 3, 4, 1]))

        def torch_forward(logits):
            from ..backend import to_host
            torch = _torch()
            target = torch.tensor(np.asarray(to_host(targets), dtype=np.float64 if soft else np.int64))
            return torch.nn.functional.cross_entropy(logits, target, label_smoothing=smoothing)

        return dict(forward=lambda z: cross_entropy_forward(z, targets, smoothing),
                    backward=lambda dloss, cache: cross_entropy_backward(cache, dloss), args=[r(4, K, scale=2.0)],
                    names=["logits"], torch_forward=torch_forward)
    return build


def _model(variant):
    """The whole ViT, every parameter an argument (the images too), directional by default.

    ``"prenorm"``: timm's layout (pre-norm, class token, learned positions, plain attention),
    with PyTorch's version beside it (``tinyvit.benchmark.torch_ref``). ``"variants"``: the other
    paths: post-norm, mean pooling into fc_norm, flash attention (2x2 tiles), learned 2D RoPE
    (rope_mixed), tanh GELU, and training-mode dropout, attention dropout and drop path with fixed
    masks (so the forward is a function). ``"distilled"``: DeiT's distillation token and second
    head, a fixed 2D sin-cos table, no qkv bias, dropout masks. No PyTorch twin for the last two
    here (tests/test_model_twin.py has one).
    """
    def build(backend, dtype):
        from ..model import VisionTransformer

        config = dict(image_size=8, patch_size=4, num_classes=5, dim=D, depth=2, heads=NH, mlp_dim=F, channels=3,
                      backend=backend, seed=0)
        if variant == "variants":
            config.update(norm_first=False, pool="mean", attn_impl="flash", attn_block=2, pos_embed="rope_mixed",
                          gelu="tanh", dropout=0.1, emb_dropout=0.1, attn_dropout=0.1, drop_path_rate=0.2)
        elif variant == "distilled":
            config.update(distilled=True, pos_embed="sincos2d", qkv_bias=False, dropout=0.1, attn_dropout=0.1,
                          drop_path_rate=0.2)
        models = {d: VisionTransformer(**config, dtype=d) for d in {dtype, "float64"}}
        model = models[dtype]
        keys = list(model.params)
        r = _rand(backend, dtype, 17)
        # trained weights are not 0.02-scale: larger ones make every path of the gradient count
        params = [r(*model.params[k].shape, scale=0.5, shift=1.0 if "norm" in k and k.endswith("weight") else 0.0)
                  for k in keys]
        c = model.config
        tokens = c.num_tokens
        masks = {"emb": r.mask(B, tokens, D, keep=0.9)}
        for i in range(c.depth):
            masks[f"blocks.{i}"] = BlockMasks(
                attn=r.mask(B, NH, tokens, tokens, keep=0.9), proj=r.mask(B, tokens, D, keep=0.9),
                mlp_hidden=r.mask(B, tokens, F, keep=0.9), mlp_out=r.mask(B, tokens, D, keep=0.9),
                path1=backend.asarray(np.array([True, i == 0]).reshape(B, 1, 1)),
                path2=backend.asarray(np.array([i == 1, True]).reshape(B, 1, 1)))
        train = variant != "prenorm"

        def forward(x, *values):
            m = models[np.dtype(x.dtype).name]
            m.params = dict(zip(keys, values))
            return m.forward(x, train=train, masks=masks if train else None), m

        def backward(dlogits, m):
            dx = m.backward(dlogits)
            return (dx, *(m.grads[k] for k in keys))

        spec = dict(forward=forward, backward=backward, args=[r(B, 3, 8, 8)] + params, names=["images"] + keys)
        if variant == "prenorm":
            def torch_forward(x, *values):
                from ..benchmark.torch_ref import vit_forward
                return vit_forward(x, dict(zip(keys, values)), c, _torch())

            spec["torch_forward"] = torch_forward
        return spec
    return build


def _model_fewer(backend, dtype):
    """The whole ViT with fewer tokens and heads: ToMe (r = 3: 17 -> 14 -> 11 tokens, proportional
    attention, the size-weighted mean pool), patch dropout in training with fixed noise (4 of 16
    patches dropped) and a gate on block 1's heads; every parameter an argument, directional."""
    from ..model import VisionTransformer

    config = dict(image_size=8, patch_size=2, num_classes=5, dim=D, depth=2, heads=NH, mlp_dim=F, channels=3,
                  pool="mean", tome_r=3, patch_drop_rate=0.25, backend=backend, seed=0)
    models = {d: VisionTransformer(**config, dtype=d) for d in {dtype, "float64"}}
    for m in models.values():
        m.set_head_gates({1: [1.0, 0.5]})
    keys = list(models[dtype].params)
    r = _rand(backend, dtype, 26)
    params = [r(*models[dtype].params[k].shape, scale=0.5, shift=1.0 if "norm" in k and k.endswith("weight") else 0.0)
              for k in keys]
    noise = backend.asarray(r.host.random((B, 16)), dtype=dtype)

    def forward(x, *values):
        m = models[np.dtype(x.dtype).name]
        m.params = dict(zip(keys, values))
        return m.forward(x, train=True, masks={"patch_drop": noise}), m

    def backward(dlogits, m):
        dx = m.backward(dlogits)
        return (dx, *(m.grads[k] for k in keys))

    return dict(forward=forward, backward=backward, args=[r(B, 3, 8, 8)] + params, names=["images"] + keys)


CASES = [
    Case("patchify", _patchify, ("patch_embed.patchify_backward",), about="(B, C, H, W) -> (B, Np, C*P*P)"),
    Case("patch_embed", _patch_embed, ("patch_embed.patch_embed_backward",), about="patching + linear = conv"),
    Case("linear", _linear, ("linear.linear_backward",), about="x W^T + b"),
    Case("linear_nobias", lambda b, d: _linear(b, d, bias=False), ("linear.linear_backward",), about="x W^T"),
    Case("cls_token", _cls_token, ("tokens.prepend_tokens_backward",), about="class + distillation tokens"),
    Case("pos_embed", _pos_embed, ("tokens.add_pos_embed_backward",), about="learned position embedding"),
    Case("layernorm", _layernorm, ("layernorm.layernorm_backward",)),
    Case("gelu", _gelu("none"), ("gelu.gelu_backward", "gelu.gelu_reference_backward"), about="exact (erf)"),
    Case("gelu_tanh", _gelu("tanh"), ("gelu.gelu_backward", "gelu.gelu_reference_backward"), about="tanh"),
    Case("gelu_kernel", _gelu("none", kernel=True), ("kernels.gelu_backward",), dtype="float32",
         about="the fused float32 kernel, exact"),
    Case("gelu_tanh_kernel", _gelu("tanh", kernel=True), ("kernels.gelu_backward",), dtype="float32",
         about="the fused float32 kernel, tanh"),
    Case("layernorm_kernel", _layernorm_kernel, ("kernels.layernorm_backward",), dtype="float32",
         about="the compiled float32 LayerNorm"),
    Case("softmax_kernel", _softmax_kernel, ("kernels.softmax_backward",), dtype="float32",
         about="the compiled float32 softmax"),
    Case("dropout", _dropout, ("dropout.dropout_backward",), about="fixed keep-mask, p 0.3"),
    Case("drop_path", _drop_path, ("dropout.drop_path_backward",), about="fixed per-sample mask, p 0.25"),
    Case("softmax", _softmax, ("attention.softmax_backward",)),
    Case("attention", _attention, ("attention.attention_backward",), about="2 heads, attention dropout mask"),
    Case("flash_core", _flash_core, ("flash_attention.flash_core_backward",),
         about="tiled softmax(q k^T) v, 2x2 tiles, injected mask"),
    Case("flash_attention", _flash_attention, ("flash_attention.flash_attention_backward",),
         about="flash multi-head attention, dropout from a seed"),
    Case("window_core", _window_core, ("window_attention.window_core_backward",),
         about="Swin windows 2x2, shifted, class token global, vs a dense masked softmax"),
    Case("window_attention", _window_attention, ("window_attention.window_attention_backward",),
         about="windowed multi-head attention (W-MSA) with its projections"),
    Case("relative_bias", _relative_bias, ("window_attention.relative_bias_backward",),
         about="Swin's relative position bias: gather, scatter-add"),
    Case("rope", _rope, ("rope.rope_backward",), about="2D RoPE turn, class token unturned"),
    Case("rope_angles", _rope_angles, ("rope.rope_angles_backward",), about="angles from mixed frequencies"),
    Case("patch_dropout", _patch_dropout, ("dropout.patch_dropout_backward",), about="timm's rule, half the patches"),
    Case("tome_merge", _tome_merge, ("tome.tome_merge_backward",), about="ToMe: 9 -> 6 tokens, sizes, matching fixed"),
    Case("tome_pool", _weighted_pool, ("tome.weighted_mean_pool_backward",), about="size-weighted mean pool"),
    Case("head_gate", _head_gate, ("gates.head_gate_backward",), about="a gate per head, on proj's columns"),
    Case("fake_quant", _fake_quant, ("quant.fake_quant_backward",), about="QAT's clipped STE, on its smooth surrogate"),
    Case("quant_linear", _quant_linear, ("quant.quant_linear_backward",),
         about="QAT linear: fake-quantised input and weight, smooth surrogate"),
    Case("mlp", _mlp, ("mlp.mlp_backward",), about="fc1, GELU, dropout masks, fc2"),
    Case("block_prenorm", _block(True), ("block.block_backward",), about="timm; every dropout mask, drop path"),
    Case("block_postnorm", _block(False), ("block.block_backward",), about="nn.TransformerEncoderLayer; tanh GELU"),
    Case("pool_cls", _pool("cls"), ("head.pool_backward",), about="class token"),
    Case("pool_mean", _pool("mean"), ("head.pool_backward",), about="mean of the patch tokens"),
    Case("cross_entropy", _cross_entropy(False), ("loss.cross_entropy_backward",), about="class indices, smoothing 0.1"),
    Case("cross_entropy_soft", _cross_entropy(True), ("loss.cross_entropy_backward",),
         about="soft targets, smoothing 0.1"),
    Case("model_fewer", _model_fewer, (), mode="directional",
         about="ToMe r=3 + patch dropout + a head gate, the whole ViT"),
    Case("model", _model("prenorm"), (), mode="directional", about="the whole ViT (timm's layout), every parameter"),
    Case("model_variants", _model("variants"), (), mode="directional",
         about="post-norm, mean pool, flash, RoPE, dropout masks"),
    Case("model_distilled", _model("distilled"), (), mode="directional",
         about="DeiT: distillation token and head, sin-cos table, no qkv bias"),
]


def case_names() -> list:
    return [c.name for c in CASES]


def select(names) -> list:
    """The cases called ``names`` (all of them for None/empty), or a ValueError naming the unknown ones."""
    if not names:
        return list(CASES)
    by_name = {c.name: c for c in CASES}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown gradcheck case(s) {unknown}; the cases are: {', '.join(by_name)}")
    return [by_name[n] for n in names]
