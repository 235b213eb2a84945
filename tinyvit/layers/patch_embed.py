"""Image patching and patch embedding.

Derivation: docs/patching.md (the learners' tour: examples/01_patches.py, examples/00_tutorial_mistakes.py)

Patching cuts ``(B, C, H, W)`` into ``Np = (H/P) * (W/P)`` non-overlapping ``P x P``
patches, row by row, and flattens each in ``(c, p1, p2)`` order::

    x: (B, C, H, W) -> patches: (B, Np, C*P*P)

That order is the memory order of a PyTorch ``Conv2d(C, D, kernel_size=P, stride=P)``
weight ``(D, C, P, P)``, so ``weight.reshape(D, C*P*P)`` is the linear layer that
makes the same embedding: ``patch_embed(x) == conv(x).flatten(2).transpose(1, 2)``.
(The tutorial flattens ``(p1 p2 c)``, which is the same idea in another order and
cannot take a conv weight unchanged.)

Patching only moves elements, so its backward is its inverse (``unpatchify``):
every input pixel lands in exactly one patch slot, and its gradient comes back from
exactly that slot.
"""
from __future__ import annotations

from typing import NamedTuple

from einops import rearrange

from .linear import LinearCache, linear_backward, linear_forward


class PatchifyCache(NamedTuple):
    grid_h: int  # H / P
    grid_w: int  # W / P
    patch_size: int  # P


def patchify_forward(x, patch_size: int):
    """``x: (B, C, H, W) -> patches: (B, Np, C*P*P)``; cache: the grid and P (no arrays)."""
    _, _, height, width = x.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image is {height}x{width}, not divisible by patch size {patch_size}")
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = rearrange(x, "b c (gh p1) (gw p2) -> b (gh gw) (c p1 p2)", p1=patch_size, p2=patch_size)
    return patches, PatchifyCache(grid_h, grid_w, patch_size)


def unpatchify(patches, grid_h: int, grid_w: int, patch_size: int):
    """The inverse of patching: ``patches: (B, Np, C*P*P) -> (B, C, H, W)``."""
    return rearrange(
        patches, "b (gh gw) (c p1 p2) -> b c (gh p1) (gw p2)",
        gh=grid_h, gw=grid_w, p1=patch_size, p2=patch_size,
    )


def patchify_backward(dpatches, cache: PatchifyCache):
    """``dpatches: (B, Np, C*P*P) -> dx: (B, C, H, W)``: the same permutation, undone."""
    return unpatchify(dpatches, cache.grid_h, cache.grid_w, cache.patch_size)


class PatchEmbedCache(NamedTuple):
    patchify: PatchifyCache
    linear: LinearCache  # holds the patches (B, Np, C*P*P): a copy, so the caller may reuse its image buffer
    weight_shape: tuple  # (D, C, P, P)


def patch_embed_forward(x, w, b, precision: str = "fp32"):
    """Patching then a linear map, i.e. a stride-P convolution.

    ``x: (B, C, H, W), w: (D, C, P, P), b: (D,) -> out: (B, Np, D)``;
    cache: the patches ``(B, Np, C*P*P)`` and ``w``. The patches are cached rather than a
    reference to ``x`` (4.8 MB for ViT-Ti/16 at batch 8, 1.5% of a step's peak): a caller
    that refills its image buffer before ``backward`` must not get a silently wrong ``dw``.
    ``precision``: the linear map's product in fp32 / fp16 / bf16 (layers/precision.py).
    """
    d_model, channels, patch_size, _ = w.shape
    patches, patchify_cache = patchify_forward(x, patch_size)  # (B, Np, C*P*P)
    if patch_size == 1:  # then patching can be a mere reshape, a view of x: own a copy
        patches = patches.copy()
    w_2d = w.reshape(d_model, channels * patch_size * patch_size)  # (D, C*P*P)
    out, linear_cache = linear_forward(patches, w_2d, b, precision)  # (B, Np, C*P*P) @ (C*P*P, D) -> (B, Np, D)
    return out, PatchEmbedCache(patchify_cache, linear_cache, tuple(w.shape))


def patch_embed_backward(dout, cache: PatchEmbedCache):
    """``dout: (B, Np, D) -> dx: (B, C, H, W), dw: (D, C, P, P), db: (D,)``."""
    dpatches, dw_2d, db = linear_backward(dout, cache.linear)  # (B, Np, C*P*P), (D, C*P*P), (D,)
    dx = patchify_backward(dpatches, cache.patchify)  # (B, C, H, W)
    return dx, dw_2d.reshape(cache.weight_shape), db
