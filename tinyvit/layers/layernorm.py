"""Layer normalisation over the last axis (``D``), with learnable scale and shift.

Derivation: docs/layernorm.md (the learners' tour: examples/04_forward_backward.py, examples/05_post_vs_pre_norm.py)

Forward, per token (``x`` a row of length D)::

    mean = sum(x) / D
    rstd = 1 / sqrt(sum((x - mean)^2) / D + eps)     # biased variance, as PyTorch
    x_hat = (x - mean) * rstd
    out = x_hat * w + b

Backward. With ``dx_hat = dout * w`` and ``x_hat`` depending on every element of the
row through ``mean`` and ``rstd``, the chain rule collapses to::

    dx = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat))
    dw = sum over (B, N) of dout * x_hat
    db = sum over (B, N) of dout

(the first mean term removes the shift through ``mean``; the second, the scale through
``rstd``, since ``d rstd / d x_j = -rstd^3 (x_j - mean) / D``.)
"""
from __future__ import annotations

from typing import NamedTuple

from . import kernels
from ..backend import array_module


class LayerNormCache(NamedTuple):
    x_hat: object  # (..., D): the normalised input, reused by dw and dx
    rstd: object  # (..., 1): 1 / std, reused by dx
    w: object  # (D,): the scale, for dx_hat


def layernorm_forward(x, w, b, eps: float):
    """``x: (..., D), w: (D,), b: (D,) -> out: (..., D)``; cache: x_hat (..., D), rstd (..., 1), w.

    float32 NumPy runs the compiled loop of :mod:`tinyvit.layers.kernels` (the same numbers within
    float32 rounding, ``tests/test_kernels_numba.py``); otherwise the formula below, the reference.
    """
    fast = kernels.layernorm_forward(x, w, b, eps)
    if fast is not None:
        out, x_hat, rstd = fast
        return out, LayerNormCache(x_hat, rstd, w)
    xp = array_module(x)
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    centered = x - mean  # (..., D)
    var = xp.einsum("...i,...i->...", centered, centered)[..., None] / x.shape[-1]  # (..., 1): mean of squares
    rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)
    x_hat = centered  # the same buffer, normalised in place: (x - mean) * rstd
    x_hat *= rstd  # (..., D)
    out = x_hat * w  # (..., D)
    out += b
    return out, LayerNormCache(x_hat, rstd, w)


def layernorm_backward(dout, cache: LayerNormCache):
    """``dout: (..., D) -> dx: (..., D), dw: (D,), db: (D,)``; the compiled loop for float32 NumPy, else below."""
    x_hat, rstd, w = cache
    fast = kernels.layernorm_backward(dout, x_hat, rstd, w)
    if fast is not None:
        return fast
    xp = array_module(x_hat)
    dim = x_hat.shape[-1]
    dout_2d = dout.reshape(-1, dim)  # (M, D)
    dw = (dout_2d * x_hat.reshape(-1, dim)).sum(axis=0)  # (D,)
    db = dout_2d.sum(axis=0)  # (D,)
    dx_hat = dout * w  # (..., D)
    mean_dx_hat = dx_hat.mean(axis=-1, keepdims=True)  # (..., 1)
    mean_dx_hat_x_hat = xp.einsum("...i,...i->...", dx_hat, x_hat)[..., None] / dim  # (..., 1)
    # dx = rstd * (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat), built in dx_hat's buffer
    dx = dx_hat
    dx -= mean_dx_hat
    dx -= x_hat * mean_dx_hat_x_hat
    dx *= rstd  # (..., D)
    return dx, dw, db
