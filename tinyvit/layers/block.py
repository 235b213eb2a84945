"""One transformer encoder block, pre-norm or post-norm, as a forward/backward pair.

Derivation: docs/block.md (the learners' tour: examples/05_post_vs_pre_norm.py)

Pre-norm (``norm_first=True``: the ViT paper, timm)::

    h   = x + drop_path(proj_drop(attn(norm1(x))))
    out = h + drop_path(mlp(norm2(h)))

Post-norm (``norm_first=False``: PyTorch's ``nn.TransformerEncoderLayer`` default,
which the tutorial uses)::

    h   = norm1(x + drop_path(proj_drop(attn(x))))
    out = norm2(h + drop_path(mlp(h)))

The backward reads the forward bottom-up; at each residual ``h = x + f(x)`` the
gradient arrives twice and is added: ``dx = dh (skip) + df/dx^T dh (branch)``.

Fewer tokens, fewer heads (docs/tome.md, docs/head_pruning.md): with ``tome_r > 0`` the block
merges ``r`` tokens between the attention and the MLP (ToMe; the matching is on the attention's
head-averaged keys), and the token sizes it carries feed the next block's attention as a
``log(size)`` score bias. ``head_gate`` ``(NH,)`` multiplies each head's output (the gate's
gradient comes back as ``grads["attn.head_gate"]``).

Parameters come in as a dict with the block's timm keys without the ``blocks.{i}.``
prefix (``norm1.weight``, ``attn.qkv.weight``, ``mlp.fc1.weight``, ...); the
gradients go out as a dict with the same keys, plus ``attn.rope_angles`` (the gradient of
the 2D RoPE angles, not a parameter) when the block turned q and k.
"""
from __future__ import annotations

from typing import NamedTuple

from .attention import AttentionCache, attention_backward, attention_forward
from .flash_attention import (DEFAULT_BLOCK, FlashAttentionCache, flash_attention_backward,
                              flash_attention_forward)
from .window_attention import WindowAttentionCache, WindowSpec, window_attention_backward, window_attention_forward
from .dropout import DropoutCache, drop_path_backward, drop_path_forward, dropout_backward, dropout_forward
from .gates import HeadGateCache, head_gate_backward, head_gate_forward
from .layernorm import LayerNormCache, layernorm_backward, layernorm_forward
from .mlp import MlpCache, mlp_backward, mlp_forward
from .tome import TomeMergeCache, size_bias, tome_match, tome_merge_backward, tome_merge_forward

BLOCK_KEYS = (
    "norm1.weight", "norm1.bias",
    "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)
WINDOW_KEYS = ("attn.relative_position_bias_table",)  # windowed attention only (Swin's key): ((2M-1)^2, NH)


class BlockMasks(NamedTuple):
    """Injected dropout keep-masks (bool), for tests that must see the same draw as PyTorch."""

    attn: object = None  # (B, NH, N, N): attention-probability dropout
    proj: object = None  # (B, N, D): after the attention's output projection
    mlp_hidden: object = None  # (B, N, F): after GELU
    mlp_out: object = None  # (B, N, D): after fc2
    path1: object = None  # (B, 1, 1): drop path of the attention branch
    path2: object = None  # (B, 1, 1): drop path of the MLP branch


class BlockCache(NamedTuple):
    norm_first: bool
    norm1: LayerNormCache
    attn: AttentionCache | FlashAttentionCache | WindowAttentionCache
    proj_drop: DropoutCache
    path1: DropoutCache
    norm2: LayerNormCache
    mlp: MlpCache
    path2: DropoutCache
    gate: HeadGateCache | None = None  # head gates, when given
    tome: TomeMergeCache | None = None  # the token merge, when tome_r > 0
    size: object = None  # (B, N', 1): token sizes after this block's merge (None: all 1, nothing merged yet)


def block_forward(x, p: dict, heads: int, eps: float, norm_first: bool = True, dropout: float = 0.0,
                  attn_dropout: float = 0.0, drop_path: float = 0.0, approximate: str = "none",
                  train: bool = False, rng=None, masks: BlockMasks | None = None, attn_impl: str = "plain",
                  attn_block: int = DEFAULT_BLOCK, rope_angles=None, num_prefix: int = 1,
                  precision: str = "fp32", window: WindowSpec | None = None, *, tome_r: int = 0, size=None,
                  head_gate=None):
    """``x: (B, N, D) -> out: (B, N - tome_r, D)``; cache: the caches of the two norms, attention, MLP and masks.

    ``attn_impl``: ``"plain"`` (attention.py) or ``"flash"`` (flash_attention.py, tiles of ``attn_block``);
    ``window``: windowed attention (window_attention.py) with ``p["attn.relative_position_bias_table"]``.
    ``rope_angles: (NH or 1, N - num_prefix, hs/2)`` turns the attention's q and k (2D RoPE, rope.py).
    ``precision``: the matrix products of attention and MLP in fp32 / fp16 / bf16; the norms and
    residual adds stay float32 (mixed precision, layers/precision.py; plain attention only).
    ``size: (B, N, 1) | None``: token sizes from the blocks before (ToMe); the new sizes are
    ``cache.size``. ``num_prefix``: the leading tokens, never merged.
    """
    m = masks or BlockMasks()
    gate_cache = tome_cache = None
    if (tome_r or size is not None) and attn_impl != "plain":
        raise ValueError(f"token merging (tome_r={tome_r}) needs attn_impl='plain' (it reads the keys and adds a "
                         f"size bias to the scores), got attn_impl={attn_impl!r}")

    def attention_branch(a):  # (B, N, D) -> (B, N, D)
        nonlocal gate_cache
        if (attn_impl == "flash" or window is not None) and precision != "fp32":
            raise ValueError(f"precision={precision!r} needs attn_impl='plain' without attn_window (flash and "
                             f"windowed attention run in the model's dtype)")
        proj_w = p["attn.proj.weight"]
        if head_gate is not None:  # a gate on each head's output = a scale on its columns of proj (gates.py)
            proj_w, gate_cache = head_gate_forward(proj_w, head_gate, heads)
        attn_args = (p["attn.qkv.weight"], p["attn.qkv.bias"], proj_w, p["attn.proj.bias"], heads)
        if window is not None:
            a, attn_cache = window_attention_forward(a, *attn_args[:4], p["attn.relative_position_bias_table"], heads,
                                                     window, attn_dropout, train, rng, m.attn, rope_angles)
        elif attn_impl == "flash":
            a, attn_cache = flash_attention_forward(a, *attn_args, attn_block, attn_dropout, train, rng, m.attn,
                                                    rope_angles, num_prefix)
        elif attn_impl == "plain":
            bias = None if size is None else size_bias(size)  # (B, 1, 1, N): ToMe's proportional attention
            a, attn_cache = attention_forward(a, *attn_args, attn_dropout, train, rng, m.attn, rope_angles, num_prefix,
                                              precision=precision, score_bias=bias)
        else:
            raise ValueError(f"attn_impl must be 'plain' or 'flash', got {attn_impl!r}")
        a, proj_cache = dropout_forward(a, dropout, train, rng, m.proj)
        a, path_cache = drop_path_forward(a, drop_path, train, rng, m.path1)
        return a, attn_cache, proj_cache, path_cache

    def mlp_branch(h):  # (B, N, D) -> (B, N, D)
        h, mlp_cache = mlp_forward(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"], p["mlp.fc2.weight"], p["mlp.fc2.bias"],
                                   dropout, train, rng, approximate, (m.mlp_hidden, m.mlp_out), precision)
        h, path_cache = drop_path_forward(h, drop_path, train, rng, m.path2)
        return h, mlp_cache, path_cache

    def merge(h, attn_cache):  # ToMe between attention and MLP: (B, N, D) -> (B, N - r, D)
        if not tome_r:
            return h, size, None
        match = tome_match(attn_cache.k.mean(axis=1), tome_r, num_prefix)  # keys averaged over heads (B, N, hs)
        h, merge_cache = tome_merge_forward(h, size, match)
        return h, merge_cache.size_out, merge_cache

    if norm_first:
        a, norm1_cache = layernorm_forward(x, p["norm1.weight"], p["norm1.bias"], eps)
        a, attn_cache, proj_cache, path1_cache = attention_branch(a)
        h = x + a  # residual
        h, size, tome_cache = merge(h, attn_cache)
        f, norm2_cache = layernorm_forward(h, p["norm2.weight"], p["norm2.bias"], eps)
        f, mlp_cache, path2_cache = mlp_branch(f)
        out = h + f  # residual
    else:
        a, attn_cache, proj_cache, path1_cache = attention_branch(x)
        h, norm1_cache = layernorm_forward(x + a, p["norm1.weight"], p["norm1.bias"], eps)
        h, size, tome_cache = merge(h, attn_cache)
        f, mlp_cache, path2_cache = mlp_branch(h)
        out, norm2_cache = layernorm_forward(h + f, p["norm2.weight"], p["norm2.bias"], eps)
    cache = BlockCache(norm_first, norm1_cache, attn_cache, proj_cache, path1_cache, norm2_cache, mlp_cache,
                       path2_cache, gate_cache, tome_cache, size)
    return out, cache


def block_backward(dout, cache: BlockCache):
    """``dout: (B, N, D) -> dx: (B, N, D), grads: {key: array}`` with the keys of :data:`BLOCK_KEYS`."""
    g = {}

    def attention_branch_backward(da):
        da = drop_path_backward(da, cache.path1)
        da = dropout_backward(da, cache.proj_drop)
        if isinstance(cache.attn, WindowAttentionCache):
            da, g["attn.qkv.weight"], g["attn.qkv.bias"], g["attn.proj.weight"], g["attn.proj.bias"], \
                g["attn.relative_position_bias_table"], *drope = window_attention_backward(da, cache.attn)
            if drope:
                g["attn.rope_angles"] = drope[0]
            return da
        backward = flash_attention_backward if isinstance(cache.attn, FlashAttentionCache) else attention_backward
        da, g["attn.qkv.weight"], g["attn.qkv.bias"], g["attn.proj.weight"], g["attn.proj.bias"], *drope = \
            backward(da, cache.attn)
        if drope:
            g["attn.rope_angles"] = drope[0]
        if cache.gate is not None:  # the gradient was the gated weight's
            g["attn.proj.weight"], g["attn.head_gate"] = head_gate_backward(g["attn.proj.weight"], cache.gate)
        return da

    def mlp_branch_backward(df):
        df = drop_path_backward(df, cache.path2)
        df, g["mlp.fc1.weight"], g["mlp.fc1.bias"], g["mlp.fc2.weight"], g["mlp.fc2.bias"] = \
            mlp_backward(df, cache.mlp)
        return df

    if cache.norm_first:
        # out = h + mlp_branch(norm2(h))
        df = mlp_branch_backward(dout)
        df, g["norm2.weight"], g["norm2.bias"] = layernorm_backward(df, cache.norm2)
        dh = dout + df
        del df  # (B, N, D): not needed past the residual; freed before the attention's backward
        if cache.tome is not None:
            dh = tome_merge_backward(dh, cache.tome)  # (B, N - r, D) -> (B, N, D)
        # h = x + attention_branch(norm1(x))
        da = attention_branch_backward(dh)
        da, g["norm1.weight"], g["norm1.bias"] = layernorm_backward(da, cache.norm1)
        dx = dh + da
    else:
        # out = norm2(h + mlp_branch(h))
        dsum2, g["norm2.weight"], g["norm2.bias"] = layernorm_backward(dout, cache.norm2)
        dh = dsum2 + mlp_branch_backward(dsum2)
        if cache.tome is not None:
            dh = tome_merge_backward(dh, cache.tome)  # (B, N - r, D) -> (B, N, D)
        # h = norm1(x + attention_branch(x))
        dsum1, g["norm1.weight"], g["norm1.bias"] = layernorm_backward(dh, cache.norm1)
        dx = dsum1 + attention_branch_backward(dsum1)
    return dx, g
