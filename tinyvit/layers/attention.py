"""Softmax and multi-head self-attention (timm's layout: one fused ``qkv`` projection).

Derivation: docs/softmax_attention.md (the learners' tour: examples/03_attention.py)

Shapes: ``B`` batch, ``N`` tokens, ``D`` width, ``NH`` heads, ``hs = D / NH``.

Forward::

    qkv = x @ W_qkv.T + b_qkv                        (B, N, 3D), split as [q | k | v], heads inside each
    q, k, v                                          (B, NH, N, hs) each
    scores = q @ k^T / sqrt(hs)                      (B, NH, N, N)
    att = softmax(scores) over the last axis         (B, NH, N, N)   <- readable after forward
    y = dropout(att) @ v                             (B, NH, N, hs) -> (B, N, D)
    out = y @ W_proj.T + b_proj                      (B, N, D)

With 2D RoPE (``rope_angles``, tinyvit/layers/rope.py) q and k are turned right after the
split, the ``num_prefix`` class/distillation tokens left as they are; the backward turns
dq and dk back and also returns the gradient of the angles.

Softmax backward: ``s = softmax(z)`` has Jacobian ``diag(s) - s s^T``, so per row::

    dz = s * (ds - sum(ds * s))

Attention backward, read bottom-up (``att_d`` is ``att`` after dropout)::

    dy    -> datt_d = dy @ v^T,   dv = att_d^T @ dy
    datt  = dropout_backward(datt_d)
    dscores = softmax_backward(datt)
    dq = dscores @ k / sqrt(hs),  dk = dscores^T @ q / sqrt(hs)
    [dq | dk | dv] -> dqkv (B, N, 3D) -> the qkv linear's backward
"""
from __future__ import annotations

import math
from typing import NamedTuple

from . import kernels
from ..backend import array_module
from .dropout import DropoutCache, dropout_backward, dropout_forward
from .linear import LinearCache, linear_backward, linear_forward
from .rope import RopeCache, rope_backward, rope_forward
from .precision import lowp_matmul


class SoftmaxCache(NamedTuple):
    out: object  # (..., N): the probabilities; the Jacobian is a function of them alone


def softmax_forward(x):
    """``x: (..., N) -> out: (..., N)``, rows sum to 1; max-subtracted so exp never overflows.

    float32 NumPy runs the compiled loop of :mod:`tinyvit.layers.kernels`; otherwise the formula below.
    """
    out = kernels.softmax_forward(x)
    if out is not None:
        return out, SoftmaxCache(out)
    xp = array_module(x)
    out = x - x.max(axis=-1, keepdims=True)  # (..., N): shifted, max 0; then exp and normalise in place
    xp.exp(out, out=out)
    out /= out.sum(axis=-1, keepdims=True)
    return out, SoftmaxCache(out)


def softmax_backward(dout, cache: SoftmaxCache):
    """``dout: (..., N) -> dx: (..., N)``: ``s * (dout - sum(dout * s))`` row by row."""
    s = cache.out
    dx = kernels.softmax_backward(dout, s)
    if dx is not None:
        return dx
    xp = array_module(s)
    dot = xp.einsum("...j,...j->...", dout, s)[..., None]  # (..., 1): sum(dout * s), without an (..., N) temporary
    dx = dout - dot  # (..., N)
    dx *= s
    return dx


class AttentionCache(NamedTuple):
    qkv: LinearCache
    q: object  # (B, NH, N, hs)
    k: object  # (B, NH, N, hs)
    v: object  # (B, NH, N, hs)
    att: SoftmaxCache  # att.out: (B, NH, N, N), the attention probabilities
    att_dropout: DropoutCache
    att_d: object  # (B, NH, N, N): att after dropout (att itself when no dropout)
    proj: LinearCache
    heads: int
    scale: float
    rope_q: RopeCache | None = None  # 2D RoPE on q and k (q and k above are the turned ones)
    rope_k: RopeCache | None = None
    precision: str = "fp32"  # the products' precision (layers/precision.py); softmax stays float32


def attention_forward(x, qkv_w, qkv_b, proj_w, proj_b, heads: int, attn_drop: float = 0.0,
                      train: bool = False, rng=None, attn_mask=None, rope_angles=None, num_prefix: int = 1,
                      precision: str = "fp32", score_bias=None):
    """Multi-head self-attention.

    ``x: (B, N, D), qkv_w: (3D, D), qkv_b: (3D,) | None, proj_w: (D, D), proj_b: (D,)
    -> out: (B, N, D)``; cache: q, k, v ``(B, NH, N, hs)``, att ``(B, NH, N, N)``, dropout mask.
    ``attn_mask`` injects the attention-dropout keep-mask ``(B, NH, N, N)``.
    ``rope_angles: (NH or 1, N - num_prefix, hs/2)`` turns q and k (2D RoPE) past the prefix tokens.
    ``precision``: the four products (qkv, ``q k^T``, ``att v``, proj) in fp32 / fp16 / bf16; the softmax in float32.
    ``score_bias`` ``(B, 1, 1, N)`` is added to the scores before the softmax, a constant of the step (ToMe's
    proportional attention adds ``log(token size)``; docs/tome.md): the backward is unchanged.
    """
    batch, tokens, dim = x.shape
    head_size = qkv_w.shape[0] // (3 * heads)  # D / NH; a pruned block keeps hs with fewer heads (NH hs < D)
    scale = 1.0 / math.sqrt(head_size)
    qkv, qkv_cache = linear_forward(x, qkv_w, qkv_b, precision)  # (B, N, D) @ (D, 3D) -> (B, N, 3D)
    qkv = qkv.reshape(batch, tokens, 3, heads, head_size).transpose(2, 0, 3, 1, 4)  # (3, B, NH, N, hs)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, NH, N, hs) each
    rope_q = rope_k = None
    if rope_angles is not None:
        q, rope_q = rope_forward(q, rope_angles, num_prefix)  # (B, NH, N, hs), turned by position
        k, rope_k = rope_forward(k, rope_angles, num_prefix)
    scores = lowp_matmul(q, k.swapaxes(-1, -2), precision)  # (B, NH, N, hs) @ (B, NH, hs, N) -> (B, NH, N, N)
    scores *= scale
    if score_bias is not None:
        scores += score_bias
    att, att_cache = softmax_forward(scores)  # (B, NH, N, N)
    att_d, drop_cache = dropout_forward(att, attn_drop, train, rng, attn_mask)  # (B, NH, N, N)
    y = lowp_matmul(att_d, v, precision)  # (B, NH, N, N) @ (B, NH, N, hs) -> (B, NH, N, hs)
    y = y.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * head_size)  # (B, N, NH, hs) -> (B, N, D)
    out, proj_cache = linear_forward(y, proj_w, proj_b, precision)  # (B, N, D) @ (D, D) -> (B, N, D)
    cache = AttentionCache(qkv_cache, q, k, v, att_cache, drop_cache, att_d, proj_cache, heads, scale, rope_q, rope_k,
                           precision)
    return out, cache


def attention_backward(dout, cache: AttentionCache):
    """``dout: (B, N, D) -> dx: (B, N, D), dqkv_w: (3D, D), dqkv_b: (3D,) | None, dproj_w: (D, D), dproj_b: (D,)``,
    and a sixth, ``drope_angles: (NH or 1, Np, hs/2)``, when the forward turned q and k (2D RoPE)."""
    xp = array_module(dout)
    batch, tokens, _ = dout.shape
    heads, scale, precision = cache.heads, cache.scale, cache.precision
    head_size = cache.q.shape[-1]
    # out = y @ W_proj.T + b_proj
    dy, dproj_w, dproj_b = linear_backward(dout, cache.proj)  # (B, N, D)
    dy = dy.reshape(batch, tokens, heads, head_size).transpose(0, 2, 1, 3)  # (B, NH, N, hs)
    # y = att_d @ v
    datt_d = lowp_matmul(dy, cache.v.swapaxes(-1, -2), precision)  # (B, NH, N, hs) @ (B, NH, hs, N) -> (B, NH, N, N)
    # att_d = dropout(att); att = softmax(scores)
    datt = dropout_backward(datt_d, cache.att_dropout)
    dscores = softmax_backward(datt, cache.att)  # (B, NH, N, N)
    del datt_d, datt  # (B, NH, N, N): freed before dqkv is made (the step's peak memory is in here)
    # dq, dk, dv are written straight into their slots of dqkv, the layout of the qkv output:
    # qkv.reshape(B, N, 3, NH, hs).transpose(2, 0, 3, 1, 4) undone
    dqkv = xp.empty((batch, tokens, 3, heads, head_size), dtype=dout.dtype)  # (B, N, 3, NH, hs)
    dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, NH, N, hs) views
    if precision == "fp32":
        kernels.matmul(cache.att_d.swapaxes(-1, -2), dy, out=dv)  # dv = att_d^T @ dy: (B, NH, N, N) @ (B, NH, N, hs)
        del dy
        # scores = q @ k^T * scale
        kernels.matmul(dscores, cache.k, out=dq)  # dq = dscores @ k: (B, NH, N, N) @ (B, NH, N, hs) -> (B, NH, N, hs)
        kernels.matmul(dscores.swapaxes(-1, -2), cache.q, out=dk)  # dk = dscores^T @ q -> (B, NH, N, hs)
    else:  # the same three products in fp16 / bf16 (a rounded result cannot be written in place)
        dv[...] = lowp_matmul(cache.att_d.swapaxes(-1, -2), dy, precision)
        del dy
        dq[...] = lowp_matmul(dscores, cache.k, precision)
        dk[...] = lowp_matmul(dscores.swapaxes(-1, -2), cache.q, precision)
    dq *= scale
    dk *= scale
    del dscores
    drope = None
    if cache.rope_q is not None:  # q and k were turned: turn their gradients back, collect the angles'
        dq[...], drope_q = rope_backward(dq, cache.rope_q)
        dk[...], drope_k = rope_backward(dk, cache.rope_k)
        drope = drope_q + drope_k
    dqkv = dqkv.reshape(batch, tokens, 3 * heads * head_size)  # (B, N, 3D)
    dx, dqkv_w, dqkv_b = linear_backward(dqkv, cache.qkv)  # (B, N, D)
    if drope is not None:
        return dx, dqkv_w, dqkv_b, dproj_w, dproj_b, drope
    return dx, dqkv_w, dqkv_b, dproj_w, dproj_b
