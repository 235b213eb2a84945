"""Windowed self-attention: Swin's W-MSA and SW-MSA (Liu et al. 2021) inside a plain ViT.

Derivation: docs/window_attention.md (the learners' tour: examples/10_cheaper_attention.py)

Shapes: ``B`` batch, ``T`` prefix tokens (class token, plus DeiT's distillation token),
``Hg x Wg`` the patch grid (``Np = Hg Wg``), ``N = T + Np``, ``NH`` heads, ``hs = D / NH``,
``M`` the window side, ``nW = (Hg / M)(Wg / M)`` windows, ``S = M^2`` tokens per window.

Patch tokens attend within their ``M x M`` window of the patch grid. With a shift ``s``
(``M // 2`` on every second block, ``attn_shift=True``) the grid is first rolled by
``(-s, -s)`` so the windows straddle the previous block's borders, and Swin's mask keeps
tokens that were not neighbours before the roll from attending to each other (``-100``
added to their scores, as the Swin code). Each window adds Swin's relative position bias
``B[h, i, j] = table[index[i, j], h]``, ``table: ((2M-1)^2, NH)``, ``index: (S, S)``.

The prefix tokens follow Vision Longformer's global tokens (Zhang et al. 2021, "Multi-Scale
Vision Longformer", ICCV): a prefix token attends to all ``N`` tokens, and every patch token
attends to the ``T`` prefix tokens as well as to its window. Pairs that involve a prefix
token get no relative bias (the table stays Swin's ``(2M-1)^2 x NH``). Forward, per window::

    scores = [c q_w k_pre^T | c q_w k_w^T + bias + shift_mask]   (B, NH, nW, S, T + S), c = 1/sqrt(hs)
    att    = softmax(scores over the T + S keys)
    y_w    = att [v_pre | v_w]                                   (B, NH, nW, S, hs)
    prefix rows: y_pre = softmax(c q_pre k^T) v                   (B, NH, T, hs) The backward is
plain attention's on each piece; ``k_pre`` and ``v_pre`` are used by every window, so their
gradients are sums over the windows, and the bias's gradient ``dB = sum over B and windows of
dscores`` goes back into the table with a scatter-add: ``dtable[index[i, j], h] += dB[h, i, j]``.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from ..backend import array_module
from .attention import SoftmaxCache, softmax_backward, softmax_forward
from .dropout import DropoutCache, dropout_backward, dropout_forward
from .linear import LinearCache, linear_backward, linear_forward
from .rope import RopeCache, rope_backward, rope_forward

SHIFT_MASK_VALUE = -100.0  # Swin's value for pairs the shifted window must not join


class WindowSpec(NamedTuple):
    grid: tuple  # (Hg, Wg): the patch grid
    prefix: int  # T: tokens before the patches (attend globally)
    size: int  # M: window side
    shift: int  # s: cyclic shift of the grid, 0 or M // 2


def valid_window_sizes(grid) -> list:
    """The window sides that divide both sides of the patch grid."""
    return [m for m in range(1, min(grid) + 1) if grid[0] % m == 0 and grid[1] % m == 0]


def check_window(grid, size, shift: bool = False) -> int:
    """Raise a ValueError naming the valid sizes unless ``size`` (M) tiles the ``Hg x Wg`` grid."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise ValueError(f"attn_window must be an int >= 1 (0: global attention), got {size!r}")
    hg, wg = grid
    if size and (hg % size or wg % size):
        raise ValueError(f"attn_window={size} does not divide the {hg}x{wg} patch grid; valid window sizes: "
                         f"{valid_window_sizes(grid)}")
    if shift and not size:
        raise ValueError("attn_shift=True needs windows: set attn_window=M as well")
    if shift and size < 2:
        raise ValueError("attn_shift=True needs attn_window >= 2 (the shift is M // 2)")
    if shift and size >= min(grid):
        raise ValueError(f"attn_shift=True needs windows smaller than both sides of the {hg}x{wg} grid, got "
                         f"attn_window={size} (Swin turns the shift off when the window spans the grid); use one of "
                         f"{[m for m in valid_window_sizes(grid) if 2 <= m < min(grid)]} or attn_shift=False")
    return int(size)


def _frozen(fn):
    """Cache a host-constant builder (pure in its int arguments); the arrays come back read-only."""
    @functools.lru_cache(maxsize=64)
    def cached(*args):
        out = fn(*args)
        out.setflags(write=False)
        return out
    cached.__doc__ = fn.__doc__
    return cached


@_frozen
def relative_position_index(size: int) -> np.ndarray:
    """Swin's ``(S, S)`` index into the ``(2M-1)^2`` table: ``(dy + M-1)(2M-1) + (dx + M-1)``."""
    coords = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij")).reshape(2, -1)  # (2, S)
    rel = coords[:, :, None] - coords[:, None, :] + (size - 1)  # (2, S, S), each in [0, 2M-2]
    return rel[0] * (2 * size - 1) + rel[1]


@_frozen
def shift_mask(grid, size: int, shift: int) -> np.ndarray:
    """Swin's ``(nW, S, S)`` additive mask: 0 where two tokens of a shifted window were in the same
    region of the rolled grid, ``-100`` where the roll brought them together from opposite borders."""
    hg, wg = grid
    regions = np.zeros((hg, wg))
    label = 0
    for hs in (slice(0, -size), slice(-size, -shift), slice(-shift, None)):
        for ws in (slice(0, -size), slice(-size, -shift), slice(-shift, None)):
            regions[hs, ws] = label
            label += 1
    win = regions.reshape(hg // size, size, wg // size, size).transpose(0, 2, 1, 3).reshape(-1, size * size)
    return np.where(win[:, None, :] != win[:, :, None], SHIFT_MASK_VALUE, 0.0)


def window_token_index(spec: WindowSpec) -> np.ndarray:
    """``(nW, S)``: the token (0..N-1, prefix first) that sits in each window slot."""
    hg, wg = spec.grid
    m, s = spec.size, spec.shift
    idx = np.arange(hg * wg).reshape(hg, wg)
    idx = np.roll(idx, (-s, -s), axis=(0, 1))
    return idx.reshape(hg // m, m, wg // m, m).transpose(0, 2, 1, 3).reshape(-1, m * m) + spec.prefix


def to_windows(t, spec: WindowSpec):
    """Patch tokens ``(B, NH, Np, hs)`` -> rolled by ``(-s, -s)`` and cut into ``(B, NH, nW, S, hs)``."""
    xp = array_module(t)
    (hg, wg), m, s = spec.grid, spec.size, spec.shift
    b, nh, _, hs = t.shape
    t = t.reshape(b, nh, hg, wg, hs)
    if s:
        t = xp.roll(t, (-s, -s), axis=(2, 3))
    t = t.reshape(b, nh, hg // m, m, wg // m, m, hs).transpose(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(b, nh, (hg // m) * (wg // m), m * m, hs)


def from_windows(w, spec: WindowSpec):
    """The inverse move (and so the backward) of :func:`to_windows`: ``(B, NH, nW, S, hs) -> (B, NH, Np, hs)``."""
    xp = array_module(w)
    (hg, wg), m, s = spec.grid, spec.size, spec.shift
    b, nh, _, _, hs = w.shape
    t = w.reshape(b, nh, hg // m, wg // m, m, m, hs).transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, nh, hg, wg, hs)
    if s:
        t = xp.roll(t, (s, s), axis=(2, 3))
    return t.reshape(b, nh, hg * wg, hs)


# ---------------------------------------------------------------- relative position bias
class RelativeBiasCache(NamedTuple):
    index: object  # (S, S) int, on the device
    table_rows: int  # (2M-1)^2


def relative_bias_forward(table, size: int):
    """``table: ((2M-1)^2, NH) -> bias: (NH, S, S)``, ``bias[h, i, j] = table[index[i, j], h]`` (a gather)."""
    xp = array_module(table)
    index = xp.asarray(relative_position_index(size))  # (S, S)
    bias = table[index.reshape(-1)]  # (S*S, NH)
    s2 = size * size
    return bias.reshape(s2, s2, -1).transpose(2, 0, 1), RelativeBiasCache(index, table.shape[0])


def relative_bias_backward(dbias, cache: RelativeBiasCache):
    """``dbias: (NH, S, S) -> dtable: ((2M-1)^2, NH)``: the gather's backward is a scatter-add
    (entries of the table shared by several (i, j) pairs sum their gradients), one bincount
    over ``head * rows + index``."""
    xp = array_module(dbias)
    heads, rows = dbias.shape[0], cache.table_rows
    slots = xp.arange(heads).reshape(heads, 1) * rows + cache.index.reshape(1, -1)  # (NH, S*S)
    summed = xp.bincount(slots.reshape(-1), weights=dbias.reshape(-1), minlength=heads * rows)
    return summed.reshape(heads, rows).T.astype(dbias.dtype)  # ((2M-1)^2, NH)


# ---------------------------------------------------------------- the windowed core
class WindowCoreCache(NamedTuple):
    spec: WindowSpec
    q: object  # (B, NH, N, hs); the windowed copies are recomputed in the backward (cheap moves)
    k: object
    v: object
    att: SoftmaxCache  # (B, NH, nW, S, T + S): the window rows' probabilities
    att_drop: DropoutCache
    att_d: object  # (B, NH, nW, S, T + S), after dropout
    pre_att: SoftmaxCache  # (B, NH, T, N): the prefix rows' probabilities
    pre_drop: DropoutCache
    pre_att_d: object
    bias: RelativeBiasCache
    scale: float


def window_core_forward(q, k, v, table, scale: float, spec: WindowSpec, p: float = 0.0, train: bool = False,
                        rng=None, attn_mask=None):
    """``q, k, v: (B, NH, N, hs), table: ((2M-1)^2, NH) -> y: (B, NH, N, hs)``.

    ``attn_mask``: injected keep-masks ``(window rows (B, NH, nW, S, T + S), prefix rows (B, NH, T, N))``.
    """
    xp = array_module(q)
    t = spec.prefix
    window_mask, prefix_mask = attn_mask if attn_mask is not None else (None, None)
    qw, kw, vw = (to_windows(a[:, :, t:], spec) for a in (q, k, v))  # (B, NH, nW, S, hs)
    k_pre, v_pre = k[:, :, None, :t], v[:, :, None, :t]  # (B, NH, 1, T, hs): shared by every window
    bias, bias_cache = relative_bias_forward(table, spec.size)  # (NH, S, S)
    local = qw @ kw.swapaxes(-1, -2)  # (B, NH, nW, S, S)
    local *= scale
    local += bias[:, None]  # (NH, 1, S, S)
    if spec.shift:
        local += xp.asarray(shift_mask(spec.grid, spec.size, spec.shift), dtype=q.dtype)  # (nW, S, S)
    glob = qw @ k_pre.swapaxes(-1, -2)  # (B, NH, nW, S, T)
    glob *= scale
    att, att_cache = softmax_forward(xp.concatenate([glob, local], axis=-1))  # (B, NH, nW, S, T + S)
    att_d, drop_cache = dropout_forward(att, p, train, rng, window_mask)
    yw = att_d[..., :t] @ v_pre + att_d[..., t:] @ vw  # (B, NH, nW, S, hs)
    q_pre = q[:, :, :t]  # (B, NH, T, hs): the prefix tokens attend to everything
    pre_scores = q_pre @ k.swapaxes(-1, -2)  # (B, NH, T, N)
    pre_scores *= scale
    pre_att, pre_cache = softmax_forward(pre_scores)
    pre_att_d, pre_drop = dropout_forward(pre_att, p, train, rng, prefix_mask)
    y = xp.concatenate([pre_att_d @ v, from_windows(yw, spec)], axis=2)  # (B, NH, N, hs)
    return y, WindowCoreCache(spec, q, k, v, att_cache, drop_cache, att_d, pre_cache, pre_drop, pre_att_d,
                              bias_cache, scale)


def window_core_backward(dy, cache: WindowCoreCache):
    """``dy: (B, NH, N, hs) -> dq, dk, dv: (B, NH, N, hs), dtable: ((2M-1)^2, NH)``."""
    xp = array_module(dy)
    c, spec = cache, cache.spec
    t, scale = spec.prefix, cache.scale
    k_pre, v_pre = c.k[:, :, None, :t], c.v[:, :, None, :t]
    qw, kw, vw = (to_windows(a[:, :, t:], spec) for a in (c.q, c.k, c.v))  # (B, NH, nW, S, hs), as the forward
    dy_pre, dyw = dy[:, :, :t], to_windows(dy[:, :, t:], spec)  # (B, NH, T, hs), (B, NH, nW, S, hs)
    # prefix rows: y_pre = dropout(softmax(q_pre k^T scale)) v
    dv = c.pre_att_d.swapaxes(-1, -2) @ dy_pre  # (B, NH, N, hs)
    dpre = softmax_backward(dropout_backward(dy_pre @ c.v.swapaxes(-1, -2), c.pre_drop), c.pre_att)  # (B, NH, T, N)
    dk = dpre.swapaxes(-1, -2) @ c.q[:, :, :t]  # (B, NH, N, hs), times scale below
    dq_pre = dpre @ c.k  # (B, NH, T, hs)
    # window rows: yw = att_d[..., :T] v_pre + att_d[..., T:] v_w
    a_glob, a_loc = c.att_d[..., :t], c.att_d[..., t:]
    dvw = a_loc.swapaxes(-1, -2) @ dyw  # (B, NH, nW, S, hs)
    dv[:, :, :t] += (a_glob.swapaxes(-1, -2) @ dyw).sum(axis=2)  # v_pre served every window
    datt = xp.concatenate([dyw @ v_pre.swapaxes(-1, -2), dyw @ vw.swapaxes(-1, -2)], axis=-1)
    ds = softmax_backward(dropout_backward(datt, c.att_drop), c.att)  # (B, NH, nW, S, T + S)
    ds_glob, ds_loc = ds[..., :t], ds[..., t:]
    dtable = relative_bias_backward(ds_loc.sum(axis=(0, 2)), c.bias)  # bias (NH, S, S) was added to every window
    dqw = ds_glob @ k_pre + ds_loc @ kw  # (B, NH, nW, S, hs)
    dkw = ds_loc.swapaxes(-1, -2) @ qw
    dk[:, :, :t] += (ds_glob.swapaxes(-1, -2) @ qw).sum(axis=2)  # k_pre served every window
    dk[:, :, t:] += from_windows(dkw, spec)
    dk *= scale
    dv[:, :, t:] += from_windows(dvw, spec)
    dq = xp.concatenate([dq_pre, from_windows(dqw, spec)], axis=2)
    dq *= scale
    return dq, dk, dv, dtable


def window_probabilities(cache: WindowCoreCache):
    """The attention probabilities as a dense ``(B, NH, N, N)`` map (0 outside the windows), before dropout."""
    xp = array_module(cache.q)
    spec, t = cache.spec, cache.spec.prefix
    b, nh, n, _ = cache.q.shape
    full = xp.zeros((b, nh, n, n), dtype=cache.q.dtype)
    full[:, :, :t] = cache.pre_att.out
    tokens = xp.asarray(window_token_index(spec))  # (nW, S)
    att = cache.att.out  # (B, NH, nW, S, T + S)
    full[:, :, tokens[:, :, None], tokens[:, None, :]] = att[..., t:]
    for j in range(t):
        full[:, :, tokens, j] = att[..., j]
    return full


# ---------------------------------------------------------------- multi-head self-attention
class WindowAttentionCache(NamedTuple):
    qkv: LinearCache
    core: WindowCoreCache
    proj: LinearCache
    heads: int
    rope_q: RopeCache | None = None  # 2D RoPE on q and k (rope.py)
    rope_k: RopeCache | None = None


def window_attention_forward(x, qkv_w, qkv_b, proj_w, proj_b, table, heads: int, spec: WindowSpec,
                             attn_drop: float = 0.0, train: bool = False, rng=None, attn_mask=None,
                             rope_angles=None):
    """Windowed multi-head self-attention.

    ``x: (B, N, D), qkv_w: (3D, D), qkv_b: (3D,) | None, proj_w: (D, D), proj_b: (D,),
    table: ((2M-1)^2, NH) -> out: (B, N, D)``; ``rope_angles: (NH or 1, Np, hs/2)`` turns q and k
    (2D RoPE) before they are cut into windows, the prefix tokens unturned.
    """
    batch, tokens, dim = x.shape
    hg, wg = spec.grid
    if tokens != spec.prefix + hg * wg:
        raise ValueError(f"window attention over a {hg}x{wg} grid with {spec.prefix} prefix tokens needs "
                         f"{spec.prefix + hg * wg} tokens, got {tokens}")
    check_window(spec.grid, spec.size)
    rows = (2 * spec.size - 1) ** 2
    if tuple(table.shape) != (rows, heads):
        raise ValueError(f"relative_position_bias_table must be ((2M-1)^2, NH) = ({rows}, {heads}), "
                         f"got {tuple(table.shape)}")
    head_size = qkv_w.shape[0] // (3 * heads)  # D / NH; a pruned block keeps hs with fewer heads
    scale = 1.0 / math.sqrt(head_size)
    qkv, qkv_cache = linear_forward(x, qkv_w, qkv_b)  # (B, N, 3D)
    qkv = qkv.reshape(batch, tokens, 3, heads, head_size).transpose(2, 0, 3, 1, 4)  # (3, B, NH, N, hs)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, NH, N, hs) each
    rope_q = rope_k = None
    if rope_angles is not None:  # 2D RoPE: q and k turned by patch position, as in attention_forward
        q, rope_q = rope_forward(q, rope_angles, spec.prefix)
        k, rope_k = rope_forward(k, rope_angles, spec.prefix)
    y, core = window_core_forward(q, k, v, table, scale, spec, attn_drop, train, rng, attn_mask)
    y = y.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * head_size)  # (B, N, D)
    out, proj_cache = linear_forward(y, proj_w, proj_b)
    return out, WindowAttentionCache(qkv_cache, core, proj_cache, heads, rope_q, rope_k)


def window_attention_backward(dout, cache: WindowAttentionCache):
    """``dout: (B, N, D) -> dx, dqkv_w, dqkv_b, dproj_w, dproj_b, dtable``, and a seventh,
    ``drope_angles``, when the forward turned q and k (2D RoPE)."""
    xp = array_module(dout)
    batch, tokens, _ = dout.shape
    heads = cache.heads
    dy, dproj_w, dproj_b = linear_backward(dout, cache.proj)
    head_size = dy.shape[-1] // heads  # E / NH (E = D unless heads were pruned)
    dy = dy.reshape(batch, tokens, heads, head_size).transpose(0, 2, 1, 3)  # (B, NH, N, hs)
    dq, dk, dv, dtable = window_core_backward(dy, cache.core)
    drope = None
    if cache.rope_q is not None:  # turn the gradients of the turned q and k back; collect the angles'
        dq, drope_q = rope_backward(dq, cache.rope_q)
        dk, drope_k = rope_backward(dk, cache.rope_k)
        drope = drope_q + drope_k
    dqkv = xp.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(batch, tokens, 3 * heads * head_size)  # (B, N, 3D)
    dx, dqkv_w, dqkv_b = linear_backward(dqkv, cache.qkv)
    if drope is not None:
        return dx, dqkv_w, dqkv_b, dproj_w, dproj_b, dtable, drope
    return dx, dqkv_w, dqkv_b, dproj_w, dproj_b, dtable
