"""The transformer's MLP: ``fc1 -> GELU -> dropout -> fc2 -> dropout``.

Derivation: docs/block.md (the learners' tour: examples/04_forward_backward.py)

``x: (B, N, D) -> h: (B, N, F) -> out: (B, N, D)``; the backward runs the same five
steps in reverse, each with its own cache.
"""
from __future__ import annotations

from typing import NamedTuple

from .dropout import DropoutCache, dropout_backward, dropout_forward
from .gelu import GeluCache, gelu_backward, gelu_forward
from .linear import LinearCache, linear_backward, linear_forward


class MlpCache(NamedTuple):
    fc1: LinearCache
    gelu: GeluCache
    drop1: DropoutCache
    fc2: LinearCache
    drop2: DropoutCache


def mlp_forward(x, fc1_w, fc1_b, fc2_w, fc2_b, dropout: float = 0.0, train: bool = False, rng=None,
                approximate: str = "none", masks=(None, None), precision: str = "fp32"):
    """``x: (B, N, D), fc1_w: (F, D), fc1_b: (F,), fc2_w: (D, F), fc2_b: (D,) -> out: (B, N, D)``.

    ``masks`` injects the two dropout keep-masks ``((B, N, F), (B, N, D))``; ``precision``:
    fc1's and fc2's products in fp32 / fp16 / bf16 (GELU and dropout stay float32).
    """
    h, fc1_cache = linear_forward(x, fc1_w, fc1_b, precision)  # (B, N, D) @ (D, F) -> (B, N, F)
    h, gelu_cache = gelu_forward(h, approximate)  # (B, N, F)
    h, drop1_cache = dropout_forward(h, dropout, train, rng, masks[0])  # (B, N, F)
    out, fc2_cache = linear_forward(h, fc2_w, fc2_b, precision)  # (B, N, F) @ (F, D) -> (B, N, D)
    fc2_cache = fc2_cache._replace(x=None)  # fc2's input is recomputed in the backward, not kept
    out, drop2_cache = dropout_forward(out, dropout, train, rng, masks[1])  # (B, N, D)
    return out, MlpCache(fc1_cache, gelu_cache, drop1_cache, fc2_cache, drop2_cache)


def mlp_backward(dout, cache: MlpCache):
    """``dout: (B, N, D) -> dx: (B, N, D), dfc1_w: (F, D), dfc1_b: (F,), dfc2_w: (D, F), dfc2_b: (D,)``."""
    dout = dropout_backward(dout, cache.drop2)  # (B, N, D)
    # fc2's input dropout(gelu(h)) is recomputed from the GELU's cached h instead of being kept
    # through the step: B*N*F fewer floats per block (58 of ~290 MB for ViT-Ti/16 at batch 8,
    # which brings a training step's peak under PyTorch's) for one more GELU (~3 ms there).
    g, _ = gelu_forward(cache.gelu.x, cache.gelu.approximate)  # (B, N, F)
    if cache.drop1.mask is not None:
        g = g * cache.drop1.mask * cache.drop1.scale  # the forward's dropout, same mask
    dh, dfc2_w, dfc2_b = linear_backward(dout, cache.fc2._replace(x=g))  # (B, N, F)
    del g
    dh = dropout_backward(dh, cache.drop1)  # (B, N, F)
    dh = gelu_backward(dh, cache.gelu)  # (B, N, F)
    dx, dfc1_w, dfc1_b = linear_backward(dh, cache.fc1)  # (B, N, D)
    return dx, dfc1_w, dfc1_b, dfc2_w, dfc2_b
