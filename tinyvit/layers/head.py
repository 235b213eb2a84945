"""Pooling the token sequence into one vector per image, for the classifier head.

Derivation: docs/model.md (the learners' tour: examples/04_forward_backward.py)

``pool="cls"`` (the ViT paper): take the class token, ``x[:, 0]``.
``pool="mean"`` (timm's ``global_pool="avg"``): average the patch tokens, skipping the
``T`` prefix tokens. Both backwards scatter the gradient back to the tokens that were read;
every other token gets zero.

Where the final LayerNorm goes (in the model): with ``cls`` it normalises every token
before pooling (timm's ``norm``); with ``mean`` it normalises the pooled vector (timm's
``fc_norm``). The head itself is a plain linear layer, ``(B, D) -> (B, K)``.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import array_module


class PoolCache(NamedTuple):
    x_shape: tuple  # (B, N, D)
    first: int  # first token read
    stop: int | None  # one past the last token read (None: to the end)


def token_pool_forward(x, index: int):
    """``x: (B, N, D) -> out: (B, D)``: the token at ``index`` (0 = class token)."""
    return x[:, index], PoolCache(tuple(x.shape), index, index + 1)


def mean_pool_forward(x, num_prefix: int):
    """``x: (B, N, D) -> out: (B, D)``: the mean of the patch tokens ``x[:, T:]``."""
    return x[:, num_prefix:].mean(axis=1), PoolCache(tuple(x.shape), num_prefix, None)


def pool_backward(dout, cache: PoolCache):
    """``dout: (B, D) -> dx: (B, N, D)``: spread equally over the tokens that were pooled."""
    xp = array_module(dout)
    dx = xp.zeros(cache.x_shape, dtype=dout.dtype)
    count = len(range(cache.x_shape[1])[cache.first : cache.stop])
    dx[:, cache.first : cache.stop] = dout[:, None, :] / count if count > 1 else dout[:, None, :]
    return dx
