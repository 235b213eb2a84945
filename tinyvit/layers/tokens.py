"""From patch embeddings to the token sequence: prefix tokens and position embeddings.

Derivation: docs/tokens.md (the learners' tour: examples/02_positions.py)

``x: (B, Np, D)`` gets a learnable class token (and, for DeiT, a distillation token)
prepended, then a position embedding added::

    tokens = concat([cls_token, (dist_token,) x], axis=1) + pos_embed     (B, N, D)

with ``N = Np + T`` and ``T`` the number of prefix tokens (1, or 2 with distillation).

The position embedding is either learned (a parameter of shape ``(1, N, D)``) or a
fixed sin-cos table (no gradient): 1D over the token index as in "Attention is all
you need", or 2D as in MAE/MoCo v3 (half the channels encode the row, half the column).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import array_module


class PrefixCache(NamedTuple):
    num_prefix: int  # T: how many tokens were prepended


def prepend_tokens_forward(x, *tokens):
    """``x: (B, Np, D)``, each token ``(1, 1, D)`` -> ``out: (B, T + Np, D)``; cache: T.

    The tokens are shared by every image of the batch, so their gradient is summed
    over the batch in the backward.
    """
    xp = array_module(x)
    batch, _, dim = x.shape
    expanded = [xp.broadcast_to(t.reshape(1, 1, dim), (batch, 1, dim)) for t in tokens]  # (B, 1, D) views
    out = xp.concatenate(expanded + [x], axis=1)  # (B, T + Np, D)
    return out, PrefixCache(len(tokens))


def prepend_tokens_backward(dout, cache: PrefixCache):
    """``dout: (B, T + Np, D) -> dx: (B, Np, D)`` and one ``(1, 1, D)`` gradient per token."""
    num_prefix = cache.num_prefix
    dtokens = [dout[:, i : i + 1].sum(axis=0, keepdims=True) for i in range(num_prefix)]  # (1, 1, D)
    dx = dout[:, num_prefix:]  # (B, Np, D), a view
    return (dx, *dtokens)


def add_pos_embed_forward(x, pos_embed):
    """``x: (B, N, D) + pos_embed: (1, N, D) -> out: (B, N, D)``; nothing to cache."""
    return x + pos_embed, None


def add_pos_embed_backward(dout, cache=None):
    """``dout: (B, N, D) -> dx: (B, N, D), dpos_embed: (1, N, D)`` (summed over the batch)."""
    return dout, dout.sum(axis=0, keepdims=True)


def sincos_1d_table(num_positions: int, dim: int) -> np.ndarray:
    """Fixed 1D sinusoidal table ``(num_positions, dim)``, host NumPy float64.

    ``pe[p, 2i] = sin(p / 10000^(2i/D))``, ``pe[p, 2i+1] = cos(p / 10000^(2i/D))``.
    """
    if dim % 2:
        raise ValueError(f"the 1D sin-cos position table needs an even dim, got {dim}")
    position = np.arange(num_positions, dtype=np.float64)[:, None]  # (num_positions, 1)
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # (D/2,)
    table = np.zeros((num_positions, dim))
    table[:, 0::2] = np.sin(position * inv_freq)
    table[:, 1::2] = np.cos(position * inv_freq)
    return table


def _sincos_of(positions: np.ndarray, dim: int) -> np.ndarray:
    """MAE's layout: ``[sin(p * w_0..w_{D/2-1}), cos(p * w_0..)]``, ``(len(p), dim)``."""
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))  # (D/2,)
    angles = positions.reshape(-1)[:, None] * omega[None, :]  # (M, D/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (M, D)


def sincos_2d_table(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """Fixed 2D sin-cos table ``(grid_h * grid_w, dim)`` in patch order, host NumPy float64.

    As in MAE: the first D/2 channels encode the column, the last D/2 the row, each a
    1D sin-cos code of width D/2.
    """
    if dim % 4:
        raise ValueError(f"the 2D sin-cos position table needs dim divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
    return np.concatenate([_sincos_of(cols, dim // 2), _sincos_of(rows, dim // 2)], axis=1)  # (Np, D)


def fixed_pos_embed(kind: str, grid_h: int, grid_w: int, dim: int, num_prefix: int) -> np.ndarray:
    """A fixed position table ``(1, T + Np, D)``: prefix tokens get position 0 (1D) or zeros (2D)."""
    num_patches = grid_h * grid_w
    if kind == "sincos1d":
        table = sincos_1d_table(num_prefix + num_patches, dim)  # token index is the position
    elif kind == "sincos2d":
        table = np.concatenate([np.zeros((num_prefix, dim)), sincos_2d_table(grid_h, grid_w, dim)], axis=0)
    else:
        raise ValueError(f"pos_embed must be 'learned', 'sincos1d' or 'sincos2d', got {kind!r}")
    return table[None]  # (1, N, D)

