"""Inverted dropout and stochastic depth (drop path).

Derivation: docs/dropout.md

Dropout, in training: keep each element with probability ``1 - p`` and scale the kept
ones by ``1 / (1 - p)`` so the expectation is unchanged; in evaluation, the identity::

    out = x * mask / (1 - p)          dx = dout * mask / (1 - p)

Drop path (stochastic depth, Huang et al. 2016, as timm's ``DropPath``) is the same
with one keep/drop draw per sample: ``mask: (B, 1, ..., 1)`` drops a whole residual
branch for that image.

Randomness is an argument: either a generator (``numpy.random.Generator`` or CuPy's)
to draw the mask from, or the mask itself (the tests inject one so NumPy, CuPy and
PyTorch see the same draw). The backward reuses the cached mask.
"""
from __future__ import annotations

from typing import NamedTuple


class DropoutCache(NamedTuple):
    mask: object  # bool, broadcastable to x; None when the op was the identity
    scale: float  # 1 / (1 - p)


def draw_keep_mask(rng, shape, p: float):
    """A boolean keep-mask of ``shape``, True with probability ``1 - p``."""
    return rng.random(shape, dtype="float32") >= p


def dropout_forward(x, p: float, train: bool, rng=None, mask=None):
    """``x: (...) -> out: (...)``; cache: the keep-mask (bool, shape of x) and 1/(1-p).

    Identity (and nothing cached) when ``train`` is False or ``p == 0`` and no mask is given.
    """
    if not train or (p == 0.0 and mask is None):
        return x, DropoutCache(None, 1.0)
    if mask is None:
        if rng is None:
            raise ValueError("dropout in training needs a random generator (rng=) or a mask (mask=)")
        mask = draw_keep_mask(rng, x.shape, p)
    scale = 1.0 / (1.0 - p)
    return x * mask * scale, DropoutCache(mask, scale)


def dropout_backward(dout, cache: DropoutCache):
    """``dout: (...) -> dx: (...)``: the same mask and scale."""
    if cache.mask is None:
        return dout
    return dout * cache.mask * cache.scale


def drop_path_forward(x, p: float, train: bool, rng=None, mask=None):
    """Stochastic depth: ``x: (B, ...) -> out: (B, ...)``; one keep draw per sample, ``mask: (B, 1, .., 1)``."""
    if not train or (p == 0.0 and mask is None):
        return x, DropoutCache(None, 1.0)
    if mask is None:
        if rng is None:
            raise ValueError("drop path in training needs a random generator (rng=) or a mask (mask=)")
        mask = draw_keep_mask(rng, (x.shape[0],) + (1,) * (x.ndim - 1), p)
    scale = 1.0 / (1.0 - p)
    return x * mask * scale, DropoutCache(mask, scale)


drop_path_backward = dropout_backward  # the same rule: dx = dout * mask / (1 - p)
