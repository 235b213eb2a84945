"""Linear (fully connected) layer: ``out = x @ w.T + b``, weights stored ``(out, in)`` as in PyTorch.

Derivation: docs/linear.md (the learners' tour: examples/01_patches.py)

Shapes: ``x: (..., in)``, ``w: (out, in)``, ``b: (out,)`` or ``None`` -> ``out: (..., out)``.

Backward, with ``dout = dL/dout``::

    dx = dout @ w                          (..., out) @ (out, in) -> (..., in)
    dw = sum over leading axes of dout^T x  (out, M) @ (M, in) -> (out, in),  M = prod(...)
    db = sum over leading axes of dout      (out,)
"""
from __future__ import annotations

from typing import NamedTuple

from .precision import lowp_matmul
from .quant import FakeQuantWeight, Int8Weight, QuantLinearCache, quant_linear_backward, quant_linear_forward


class LinearCache(NamedTuple):
    x: object  # (..., in): the input, needed for dw
    w: object  # (out, in): the weight, needed for dx
    has_bias: bool
    precision: str = "fp32"  # "fp16" / "bf16": the products run in that precision (layers/precision.py)


def linear_forward(x, w, b=None, precision: str = "fp32"):
    """``x: (..., in), w: (out, in), b: (out,) | None -> out: (..., out); cache: x, w``.

    The leading axes are flattened into one ``(M, in) @ (in, out)`` product: NumPy's matmul
    of a 3-D ``x`` would run B separate products of ``(N, in)``, which BLAS runs ~1.3x
    slower than the one large product (measured on ViT-Ti/16, batch 8).
    ``precision="fp16" | "bf16"``: the product in that precision (mixed precision, as
    autocast's ``linear``); the bias is added in float32. A ``w`` that is an ``Int8Weight``
    (int8 inference) or a ``FakeQuantWeight`` (quantisation-aware training) runs the
    quantised layer of :mod:`tinyvit.layers.quant` instead.
    """
    if isinstance(w, (Int8Weight, FakeQuantWeight)):
        return quant_linear_forward(x, w, b)
    x_2d = x.reshape(-1, w.shape[1])  # (M, in), M = prod(...)
    out = lowp_matmul(x_2d, w.T, precision)  # (M, in) @ (in, out) -> (M, out)
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], w.shape[0]), LinearCache(x, w, b is not None, precision)  # (..., out)


def linear_backward(dout, cache: LinearCache):
    """``dout: (..., out) -> dx: (..., in), dw: (out, in), db: (out,) | None``.

    Mixed precision: both products in the forward's precision; ``db``, a reduction, in float32.
    A quantised forward's cache goes to :func:`tinyvit.layers.quant.quant_linear_backward`.
    """
    if isinstance(cache, QuantLinearCache):
        return quant_linear_backward(dout, cache)
    x, w, has_bias, precision = cache
    d_out, d_in = w.shape
    dout_2d = dout.reshape(-1, d_out)  # (M, out)
    x_2d = x.reshape(-1, d_in)  # (M, in)
    dx = lowp_matmul(dout_2d, w, precision).reshape(x.shape)  # (M, out) @ (out, in) -> (M, in) -> (..., in)
    dw = lowp_matmul(dout_2d.T, x_2d, precision)  # (out, M) @ (M, in) -> (out, in)
    db = dout_2d.sum(axis=0) if has_bias else None  # (out,)
    return dx, dw, db
