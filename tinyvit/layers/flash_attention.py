"""Memory-efficient attention: FlashAttention's tiled algorithm (Dao et al. 2022) in array code.

Derivation: docs/flash_attention.md (the learners' tour: examples/10_cheaper_attention.py)

Shapes: ``B`` batch, ``N`` tokens, ``D`` width, ``NH`` heads, ``hs = D / NH``, ``Br = Bc =`` the
tile side ``block`` (the last tile may be shorter).

Plain attention (``attention.py``) forms ``S = q k^T / sqrt(hs)`` and ``P = softmax(S)``,
both ``(B, NH, N, N)``, and keeps ``P`` for the backward. Flash never holds more than one
``(B, NH, Br, Bc)`` tile of them. Forward, per query tile ``i`` (online softmax)::

    m = -inf, l = 0, acc = 0                                 (B, NH, Br, 1), (.., 1), (.., hs)
    for each key tile j:
        S_ij  = q_i k_j^T * scale                            (B, NH, Br, Bc)
        m'    = max(m, rowmax S_ij)
        P~_ij = exp(S_ij - m')                               un-normalised probabilities
        l     = l exp(m - m') + rowsum P~_ij
        acc   = acc exp(m - m') + dropout(P~_ij) v_j
        m     = m'
    O_i = acc / l,   L_i = m + log l                         cached: O (B, NH, N, hs), L (B, NH, N)

Backward (recompute, never store ``P``): ``P_ij = exp(S_ij - L_i)`` exactly, and with
``D_i = rowsum(dO_i * O_i)`` (which equals ``rowsum(P_i * dP_i)``, the softmax's row dot)::

    for each key tile j, for each query tile i:
        dV_j += (Z_ij P_ij)^T dO_i                           Z = dropout keep-mask / (1 - p)
        dP_ij = (dO_i v_j^T) Z_ij
        dS_ij = P_ij (dP_ij - D_i)
        dQ_i += dS_ij k_j * scale,   dK_j += dS_ij^T q_i * scale

Attention dropout: as FlashAttention, the keep-mask is never stored. It is a pure function
of a seed drawn once per forward and of each element's global position (a counter-based
hash, SplitMix64, in place of FlashAttention's Philox), so the backward regenerates the
same mask tile by tile, and the mask does not depend on the tile size. Tests may inject
the full keep-mask instead (``attn_mask``), which is then read tile by tile.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..backend import array_module
from .linear import LinearCache, linear_backward, linear_forward
from .rope import RopeCache, rope_backward, rope_forward

DEFAULT_BLOCK = 128  # tile side; measured on ViT-Ti/16 shapes (docs/flash_attention.md, "Choosing the tile")


def check_block(block) -> int:
    """``block`` must be an int >= 1 (a tile of ``block x block`` scores)."""
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"attn_block (the flash tile side) must be an int >= 1, got {block!r}")
    return int(block)


# ---------------------------------------------------------------- dropout from a seed
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64


def draw_dropout_seed(rng):
    """A ``(1,)`` uint64 seed on the generator's device (no host round-trip)."""
    return (rng.random((1,), dtype="float64") * float(2 ** 52)).astype("uint64")


def dropout_keep_tile(seed, shape, rows: slice, cols: slice, tokens: int, p: float):
    """The keep-mask (bool) of tile ``[rows, cols]`` of a ``(B, NH, N, N)`` attention.

    Element ``(b, h, r, c)`` is kept when the SplitMix64 hash of ``seed`` and its global
    index ``((b NH + h) N + r) N + c``, as a uniform number in [0, 1), is at least ``p``.
    """
    xp = array_module(seed)
    batch, heads = shape[0], shape[1]
    u64 = lambda c: xp.asarray(c, dtype="uint64")  # noqa: E731 - 0-d device constants
    bh = xp.arange(batch * heads, dtype="uint64").reshape(batch, heads, 1, 1)
    r = xp.arange(rows.start, rows.stop, dtype="uint64").reshape(-1, 1)
    c = xp.arange(cols.start, cols.stop, dtype="uint64")
    z = ((bh * u64(tokens) + r) * u64(tokens) + c) * u64(_GOLDEN) + seed  # wraps modulo 2^64
    z = (z ^ xp.right_shift(z, u64(30))) * u64(_MIX1)
    z = (z ^ xp.right_shift(z, u64(27))) * u64(_MIX2)
    z = z ^ xp.right_shift(z, u64(31))
    uniform = xp.right_shift(z, u64(40)).astype("float32") * (1.0 / (1 << 24))
    return uniform >= p


def dropout_keep_mask(seed, shape, p: float):
    """The whole ``(B, NH, N, N)`` keep-mask that the tiles of a forward with ``seed`` used."""
    tokens = shape[-1]
    return dropout_keep_tile(seed, shape, slice(0, tokens), slice(0, tokens), tokens, p)


# ---------------------------------------------------------------- the tiled core
class FlashCoreCache(NamedTuple):
    q: object  # (B, NH, N, hs)
    k: object  # (B, NH, N, hs)
    v: object  # (B, NH, N, hs)
    out: object  # (B, NH, N, hs): O
    lse: object  # (B, NH, N, 1): L = logsumexp of each row of S
    scale: float
    block: int
    p: float  # attention-dropout rate; 0 when off
    seed: object  # (1,) uint64, or None
    mask: object  # injected keep-mask (B, NH, N, N), or None


def _keep(drop, rows, cols):
    """The dropout keep-mask (bool) of one tile, or None without dropout; ``Z = keep / (1 - p)``."""
    seed, mask, p, shape = drop
    if mask is not None:
        return mask[:, :, rows, cols]
    if seed is not None:
        return dropout_keep_tile(seed, shape, rows, cols, shape[2], p)
    return None


def flash_core_forward(q, k, v, scale: float, block: int = DEFAULT_BLOCK, p: float = 0.0, train: bool = False,
                       rng=None, attn_mask=None):
    """``q, k, v: (B, NH, N, hs) -> out: (B, NH, N, hs)``: softmax(q k^T scale) v, tile by tile.

    Cache: q, k, v, O and the row logsumexp L ``(B, NH, N, 1)``; dropout's seed (or the
    injected keep-mask ``attn_mask: (B, NH, N, N)``), never a ``(B, NH, N, N)`` array of its own.
    """
    block = check_block(block)
    xp = array_module(q)
    batch, heads, tokens, _ = q.shape
    seed = mask = None
    if train and attn_mask is not None:
        mask = attn_mask
    elif train and p > 0.0:
        if rng is None:
            raise ValueError("attention dropout in training needs a random generator (rng=) or a mask (attn_mask=)")
        seed = draw_dropout_seed(rng)
    drop = (seed, mask, p, (batch, heads, tokens, tokens))
    inv_keep = 1.0 / (1.0 - p)
    out = xp.empty_like(q)
    lse = xp.empty(q.shape[:-1] + (1,), dtype=q.dtype)
    for i in range(0, tokens, block):
        rows = slice(i, min(i + block, tokens))
        q_i = q[:, :, rows]  # (B, NH, Br, hs)
        m = xp.full(q_i.shape[:-1] + (1,), -math.inf, dtype=q.dtype)  # running row max
        l = xp.zeros_like(m)  # running row sum of exp(S - m)
        acc = xp.zeros_like(q_i)  # running (B, NH, Br, hs) sum of P~ v
        for j in range(0, tokens, block):
            cols = slice(j, min(j + block, tokens))
            s = q_i @ k[:, :, cols].swapaxes(-1, -2)  # (B, NH, Br, Bc)
            s *= scale
            m_new = xp.maximum(m, s.max(axis=-1, keepdims=True))
            alpha = xp.exp(m - m_new)  # (B, NH, Br, 1): rescales what was summed under the old max
            s -= m_new
            xp.exp(s, out=s)  # P~ = exp(S - m'), in place
            l *= alpha
            l += s.sum(axis=-1, keepdims=True)
            keep = _keep(drop, rows, cols)
            if keep is not None:
                s *= keep  # Z = keep / (1 - p), applied after l took the undropped sum
                s *= inv_keep
            acc *= alpha
            acc += s @ v[:, :, cols]  # (B, NH, Br, Bc) @ (B, NH, Bc, hs)
            m = m_new
        out[:, :, rows] = acc / l
        lse[:, :, rows] = m + xp.log(l)
    return out, FlashCoreCache(q, k, v, out, lse, scale, block, p, seed, mask)


def flash_core_backward(dout, cache: FlashCoreCache, out=None):
    """``dout: (B, NH, N, hs) -> dq, dk, dv: (B, NH, N, hs)``, recomputing each tile's P from L.

    ``out``: three ``(B, NH, N, hs)`` arrays (views into the caller's ``dqkv``) to write into.
    """
    xp = array_module(dout)
    q, k, v, lse, scale, block = cache.q, cache.k, cache.v, cache.lse, cache.scale, cache.block
    tokens = q.shape[2]
    drop = (cache.seed, cache.mask, cache.p, q.shape[:2] + (tokens, tokens))
    inv_keep = 1.0 / (1.0 - cache.p)
    big_d = xp.einsum("...d,...d->...", dout, cache.out)[..., None]  # D = rowsum(dO * O): (B, NH, N, 1)
    if out is None:
        out = (xp.empty_like(q), xp.empty_like(k), xp.empty_like(v))
    dq, dk, dv = out
    dq[...] = 0.0
    for j in range(0, tokens, block):
        cols = slice(j, min(j + block, tokens))
        k_j, v_j = k[:, :, cols], v[:, :, cols]  # (B, NH, Bc, hs)
        dk_j = xp.zeros_like(k_j)
        dv_j = xp.zeros_like(v_j)
        for i in range(0, tokens, block):
            rows = slice(i, min(i + block, tokens))
            q_i, do_i = q[:, :, rows], dout[:, :, rows]  # (B, NH, Br, hs)
            pt = q_i @ k_j.swapaxes(-1, -2)  # S_ij: (B, NH, Br, Bc)
            pt *= scale
            pt -= lse[:, :, rows]
            xp.exp(pt, out=pt)  # P_ij = exp(S_ij - L_i), the forward's probabilities exactly
            dp = do_i @ v_j.swapaxes(-1, -2)  # (B, NH, Br, Bc): d(dropped P)
            keep = _keep(drop, rows, cols)
            if keep is None:
                dv_j += pt.swapaxes(-1, -2) @ do_i  # (B, NH, Bc, Br) @ (B, NH, Br, hs)
            else:
                z = pt * keep  # Z P, Z = keep / (1 - p)
                z *= inv_keep
                dv_j += z.swapaxes(-1, -2) @ do_i
                dp *= keep
                dp *= inv_keep
            dp -= big_d[:, :, rows]
            dp *= pt  # dS_ij = P_ij (dP_ij - D_i)
            dq[:, :, rows] += dp @ k_j  # (B, NH, Br, Bc) @ (B, NH, Bc, hs)
            dk_j += dp.swapaxes(-1, -2) @ q_i
        dk[:, :, cols] = dk_j * scale
        dv[:, :, cols] = dv_j
    dq *= scale
    return dq, dk, dv


def flash_probabilities(cache: FlashCoreCache):
    """The attention probabilities ``(B, NH, N, N)`` of the cached forward, recomputed from
    q, k and L (before dropout): for ``attention_maps()``, which asks for them explicitly."""
    xp = array_module(cache.q)
    s = cache.q @ cache.k.swapaxes(-1, -2)
    s *= cache.scale
    s -= cache.lse
    return xp.exp(s, out=s)


# ---------------------------------------------------------------- multi-head self-attention
class FlashAttentionCache(NamedTuple):
    qkv: LinearCache
    core: FlashCoreCache
    proj: LinearCache
    heads: int
    rope_q: RopeCache | None = None  # 2D RoPE on q and k (rope.py)
    rope_k: RopeCache | None = None


def flash_attention_forward(x, qkv_w, qkv_b, proj_w, proj_b, heads: int, block: int = DEFAULT_BLOCK,
                            attn_drop: float = 0.0, train: bool = False, rng=None, attn_mask=None, rope_angles=None,
                            num_prefix: int = 1):
    """Multi-head self-attention with the tiled core; the same arguments and result as
    :func:`tinyvit.layers.attention.attention_forward`, plus ``block``.

    ``x: (B, N, D), qkv_w: (3D, D), qkv_b: (3D,) | None, proj_w: (D, D), proj_b: (D,) -> out: (B, N, D)``.
    """
    block = check_block(block)
    batch, tokens, dim = x.shape
    head_size = qkv_w.shape[0] // (3 * heads)  # D / NH; a pruned block keeps hs with fewer heads
    scale = 1.0 / math.sqrt(head_size)
    qkv, qkv_cache = linear_forward(x, qkv_w, qkv_b)  # (B, N, 3D)
    qkv = qkv.reshape(batch, tokens, 3, heads, head_size).transpose(2, 0, 3, 1, 4)  # (3, B, NH, N, hs)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, NH, N, hs) each
    rope_q = rope_k = None
    if rope_angles is not None:  # 2D RoPE: q and k turned by patch position, as in attention_forward
        q, rope_q = rope_forward(q, rope_angles, num_prefix)
        k, rope_k = rope_forward(k, rope_angles, num_prefix)
    y, core = flash_core_forward(q, k, v, scale, block, attn_drop, train, rng, attn_mask)  # (B, NH, N, hs)
    y = y.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * head_size)  # (B, N, D): a copy
    core = core._replace(out=y.reshape(batch, tokens, heads, head_size).transpose(0, 2, 1, 3))  # O as a view of y:
    # the backward's D = rowsum(dO * O) reads the same numbers, and O's own buffer is freed
    out, proj_cache = linear_forward(y, proj_w, proj_b)
    return out, FlashAttentionCache(qkv_cache, core, proj_cache, heads, rope_q, rope_k)


def flash_attention_backward(dout, cache: FlashAttentionCache):
    """``dout: (B, N, D) -> dx, dqkv_w, dqkv_b, dproj_w, dproj_b`` (as ``attention_backward``), and
    ``drope_angles`` sixth when the forward turned q and k (2D RoPE)."""
    xp = array_module(dout)
    batch, tokens, _ = dout.shape
    heads = cache.heads
    dy, dproj_w, dproj_b = linear_backward(dout, cache.proj)  # (B, N, D)
    head_size = dy.shape[-1] // heads  # E / NH (E = D unless heads were pruned)
    dy = dy.reshape(batch, tokens, heads, head_size).transpose(0, 2, 1, 3)  # (B, NH, N, hs)
    # dq, dk, dv are written straight into their slots of dqkv (B, N, 3, NH, hs), the qkv output's layout
    dqkv = xp.empty((batch, tokens, 3, heads, head_size), dtype=dout.dtype)
    dq, dk, dv = flash_core_backward(dy, cache.core, tuple(dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3)))
    drope = None
    if cache.rope_q is not None:  # turn the gradients of the turned q and k back; collect the angles'
        dq[...], drope_q = rope_backward(dq, cache.rope_q)
        dk[...], drope_k = rope_backward(dk, cache.rope_k)
        drope = drope_q + drope_k
    dqkv = dqkv.reshape(batch, tokens, 3 * heads * head_size)  # (B, N, 3D)
    dx, dqkv_w, dqkv_b = linear_backward(dqkv, cache.qkv)
    if drope is not None:
        return dx, dqkv_w, dqkv_b, dproj_w, dproj_b, drope
    return dx, dqkv_w, dqkv_b, dproj_w, dproj_b
