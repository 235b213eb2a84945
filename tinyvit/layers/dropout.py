"""Inverted dropout and stochastic depth (drop path).

Derivation: docs/dropout.md

Dropout, in training: keep each element with probability ``1 - p`` and scale the kept
ones by ``1 / (1 - p)`` so the expectation is unchanged; in evaluation, the identity::

    out = x * mask / (1 - p)          dx = dout * mask / (1 - p)

Drop path (stochastic depth, Huang et al. 2016, as timm's ``DropPath``) is the same
with one keep/drop draw per sample: ``mask: (B, 1, ..., 1)`` drops a whole residual
branch for that image.

Patch dropout (timm's ``patch_drop_rate``) drops whole patch tokens instead: the sequence
gets shorter, so the blocks run on fewer tokens (docs/patch_dropout.md).

Randomness is an argument: either a generator (``numpy.random.Generator`` or CuPy's)
to draw the mask from, or the mask itself (the tests inject one so NumPy, CuPy and
PyTorch see the same draw). The backward reuses the cached mask.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import array_module


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


class PatchDropoutCache(NamedTuple):
    rank: object  # (B, Np) int: where each patch went among the kept ones; num_keep when it was dropped
    num_prefix: int
    num_keep: int


def patch_dropout_forward(x, p: float, train: bool, num_prefix: int = 1, rng=None, noise=None):
    """PatchDropout (Liu et al. 2022; timm's ``patch_drop_rate``): train on a random subset of the patches.

    ``x: (B, T + Np, D) -> out: (B, T + K, D)``, ``K = max(1, int(Np (1 - p)))``: the ``T`` prefix tokens
    are kept, and each image keeps the patches that come first in ``argsort(noise)``, ``noise: (B, Np)``
    drawn from ``rng`` (or injected, so a test can share it with PyTorch). Like timm (``ordered=False``)
    the kept patches come in the order of the noise, not of the image. Identity in evaluation.
    """
    if not train or (p == 0.0 and noise is None):
        return x, PatchDropoutCache(None, num_prefix, 0)
    xp = array_module(x)
    batch, tokens, _ = x.shape
    num_patches = tokens - num_prefix
    num_keep = max(1, int(num_patches * (1.0 - p)))
    if noise is None:
        if rng is None:
            raise ValueError("patch dropout in training needs a random generator (rng=) or the noise (noise=)")
        noise = rng.random((batch, num_patches), dtype="float32")
    if tuple(noise.shape) != (batch, num_patches):
        raise ValueError(f"patch dropout noise must be (B, Np) = {(batch, num_patches)}, got {tuple(noise.shape)}")
    perm = xp.argsort(noise, axis=-1)  # (B, Np): a random permutation per image
    kept = xp.take_along_axis(x[:, num_prefix:], perm[:, :num_keep, None], axis=1)  # (B, K, D)
    rank = xp.minimum(xp.argsort(perm, axis=-1), num_keep)  # (B, Np): inverse permutation, dropped -> K
    return xp.concatenate([x[:, :num_prefix], kept], axis=1), PatchDropoutCache(rank, num_prefix, num_keep)


def patch_dropout_backward(dout, cache: PatchDropoutCache):
    """``dout: (B, T + K, D) -> dx: (B, T + Np, D)``: the scatter of the kept patches' gradients back
    to their places, zero for the dropped ones; done as a gather by the inverse permutation."""
    if cache.rank is None:
        return dout
    xp = array_module(dout)
    t = cache.num_prefix
    padded = xp.concatenate([dout[:, t:], xp.zeros_like(dout[:, :1])], axis=1)  # (B, K + 1, D): slot K is 0
    dpatches = xp.take_along_axis(padded, cache.rank[..., None], axis=1)  # (B, Np, D)
    return xp.concatenate([dout[:, :t], dpatches], axis=1)
