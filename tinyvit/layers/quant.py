"""INT8: symmetric quantisation, the int8 linear layer (inference, exact int32 accumulation), and
fake quantisation with its straight-through backward (quantisation-aware training).

Derivation: docs/quantization.md (the learners' tour: examples/11_lower_precision.py)

Symmetric int8 with scale ``s`` (no zero point)::

    q = clip(rint(x / s), -127, 127)            int8; rint rounds half to even
    x ~ s * q                                   the grid: 255 points, step s, covering [-127 s, 127 s]

Weights get one scale per output channel, ``s_w[o] = max_i |W[o, i]| / 127`` (a row's largest
entry lands exactly on the grid's end); a layer's input gets one scale per tensor, ``s_x``,
calibrated beforehand (tinyvit/quantize). Then a linear layer is::

    y[m, o] = sum_i x[m, i] W[o, i] + b[o]
            ~ s_x s_w[o] * sum_i q_x[m, i] q_W[o, i] + b[o]

and the sum is an integer: ``|q_x q_W| <= 127^2`` per term, ``in <= 3072`` terms in a ViT-B
fc2, so ``|sum| < 2^26``: int32 holds it exactly. NumPy has no integer BLAS (its int32 matmul
is a plain loop), so on NumPy :func:`int_matmul` multiplies the int8 values as float64 with
BLAS: every partial sum is an integer below 2^53, so float64 is exact too, and the result is
converted to int32 (tests/test_quantize.py checks it equals the int32 loop). On CuPy the
int8 values are multiplied as int32 (CuPy's integer matmul, exact).

**Quantisation-aware training** inserts the rounding into training: ``fake_quant(x, s) = s * q``
(a float that sits on the grid). ``rint`` has derivative 0 almost everywhere, which would stop
every gradient; the straight-through estimator (STE) treats ``rint`` as the identity inside the
grid's range and the clip as what it is, so::

    d fake_quant / dx = 1   where |rint(x / s)| <= 127
                        0   outside (clipped: moving x does not move the output)

which is the gradient of the smooth surrogate ``clip(x, -127 s, 127 s)`` and PyTorch's
``fake_quantize_per_tensor_affine`` backward. The scales are constants of the backward (the
weight scale is recomputed from the weights each forward, as a per-channel min-max observer).
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import array_module

QMAX = 127  # symmetric int8: [-127, 127]; -128 unused so the grid is symmetric


def weight_scales(w):
    """``w: (out, ...) -> s: (out,)`` float, ``max |w[o]| / 127`` per output channel (1 for an all-zero row)."""
    xp = array_module(w)
    amax = xp.abs(w.reshape(w.shape[0], -1)).max(axis=1)  # (out,)
    return xp.where(amax > 0, amax / QMAX, xp.ones_like(amax))


def quantize(x, scale):
    """``x: (...), scale: broadcastable -> int8 (...)``: ``clip(rint(x / scale), -127, 127)``."""
    xp = array_module(x)
    return xp.clip(xp.rint(x / scale), -QMAX, QMAX).astype(xp.int8)


def quantize_weight(w):
    """``w: (out, ...) -> (q int8 (out, ...), s float32 (out,))``: symmetric per output channel."""
    xp = array_module(w)
    s = weight_scales(w).astype(xp.float32)
    return quantize(w, s.reshape((-1,) + (1,) * (w.ndim - 1))), s


def int_matmul(a, b):
    """``a: int8 (M, K) @ b: int8 (K, N) -> int32 (M, N)``, exact.

    NumPy: float64 BLAS on the integer values (exact below 2^53; NumPy's int32 matmul has no
    BLAS and is ~20-60x slower, bench/README.md); other array modules: their int32 matmul.
    """
    xp = array_module(a)
    if xp.__name__ == "numpy":
        return (a.astype(xp.float64) @ b.astype(xp.float64)).astype(xp.int32)
    return a.astype(xp.int32) @ b.astype(xp.int32)


class Int8Weight:
    """A linear layer's weight for int8 inference: ``q`` int8 ``(out, in)`` (or the patch
    embedding's ``(D, C, P, P)``), ``scale`` float32 ``(out,)``, and ``input_scale``, the
    calibrated per-tensor scale of the layer's input (a 0-d float32 array). ``linear_forward``
    takes it in place of a float weight."""

    __slots__ = ("q", "scale", "input_scale")

    def __init__(self, q, scale, input_scale):
        self.q, self.scale, self.input_scale = q, scale, input_scale

    shape = property(lambda self: self.q.shape)

    def reshape(self, *shape):
        return Int8Weight(self.q.reshape(*shape), self.scale, self.input_scale)

    def dequantize(self):
        """The float weight this stands for: ``scale[o] * q[o]``."""
        return self.q.astype(self.scale.dtype) * self.scale.reshape((-1,) + (1,) * (self.q.ndim - 1))


class FakeQuantWeight:
    """A linear layer's float weight ``w`` under quantisation-aware training, with the calibrated
    per-tensor ``input_scale`` of the layer's input: ``linear_forward`` then fake-quantises both."""

    __slots__ = ("w", "input_scale")

    def __init__(self, w, input_scale):
        self.w, self.input_scale = w, input_scale

    shape = property(lambda self: self.w.shape)

    def reshape(self, *shape):
        return FakeQuantWeight(self.w.reshape(*shape), self.input_scale)


# ---------------------------------------------------------------- fake quantisation and the STE
class FakeQuantCache(NamedTuple):
    inside: object  # (...) bool: |rint(x / s)| <= 127, where the straight-through gradient passes


def fake_quant_forward(x, scale, rounding: bool = True):
    """``x: (...), scale: broadcastable to x -> out: (...)`` on the int8 grid ``scale * q``; cache: the mask.

    ``rounding=False`` gives the STE's smooth surrogate ``clip(x, -127 s, 127 s)`` (same
    backward): what ``tinyvit gradcheck`` checks against finite differences.
    """
    xp = array_module(x)
    r = xp.rint(x / scale)
    inside = xp.abs(r) <= QMAX
    if rounding:
        out = xp.clip(r, -QMAX, QMAX) * scale
    else:
        limit = scale * QMAX
        out = xp.clip(x, -limit, limit)
    return out.astype(x.dtype, copy=False), FakeQuantCache(inside)


def fake_quant_backward(dout, cache: FakeQuantCache):
    """``dout: (...) -> dx: (...)``: the clipped straight-through estimator, ``dout`` where inside, else 0."""
    return dout * cache.inside


# ---------------------------------------------------------------- the int8 / fake-quant linear layer
class QuantLinearCache(NamedTuple):
    x: object  # (..., in): the float input (fake-quant: re-quantised in the backward)
    w: object  # Int8Weight or FakeQuantWeight
    has_bias: bool
    wq: object = None  # (out, in): the fake-quantised weight (QAT), None for int8
    w_cache: object = None  # FakeQuantCache of the weight (QAT)
    rounding: bool = True


def quant_linear_forward(x, w, b=None, rounding: bool = True):
    """``x: (..., in), w: Int8Weight | FakeQuantWeight (out, in), b: (out,) | None -> out: (..., out)``.

    Int8Weight: ``x`` quantised with ``w.input_scale``, the int8 product accumulated exactly in
    int32, rescaled by ``input_scale * scale[o]``, the bias added in float. FakeQuantWeight:
    ``fake_quant(x) @ fake_quant(w).T + b`` in float (QAT; ``rounding=False``: the smooth surrogate).
    """
    xp = array_module(x)
    d_out, d_in = w.shape
    x_2d = x.reshape(-1, d_in)  # (M, in)
    if isinstance(w, Int8Weight):
        acc = int_matmul(quantize(x_2d, w.input_scale), w.q.T)  # (M, in) @ (in, out) -> int32 (M, out)
        out = acc.astype(x.dtype) * (w.input_scale * w.scale).astype(x.dtype)  # (M, out)
        wq = w_cache = None
    else:
        xq, _ = fake_quant_forward(x_2d, w.input_scale, rounding)  # (M, in)
        s_w = weight_scales(w.w)[:, None]  # (out, 1)
        wq, w_cache = fake_quant_forward(w.w, s_w, rounding)  # (out, in)
        out = xq @ wq.T  # (M, out)
    if b is not None:
        out += b
    cache = QuantLinearCache(x, w, b is not None, wq, w_cache, rounding)
    return out.reshape(*x.shape[:-1], d_out), cache  # (..., out)


def quant_linear_backward(dout, cache: QuantLinearCache):
    """``dout: (..., out) -> dx: (..., in), dw: (out, in), db: (out,) | None`` (QAT: the clipped STE).

    ``y = xq wq^T + b`` gives ``dxq = dout wq``, ``dwq = dout^T xq``; the STE passes each through
    its fake-quant mask: ``dx = dxq * [x inside]``, ``dw = dwq * [w inside]``.
    """
    if isinstance(cache.w, Int8Weight):
        raise RuntimeError("int8 weights are for inference; to fine-tune a quantised model use quantisation-aware "
                           "training (FakeQuantWeight, tinyvit.quantize.qat)")
    x, w = cache.x, cache.w
    d_out, d_in = w.shape
    dout_2d = dout.reshape(-1, d_out)  # (M, out)
    xq, x_cache = fake_quant_forward(x.reshape(-1, d_in), w.input_scale, cache.rounding)  # recomputed (M, in)
    dx = fake_quant_backward(dout_2d @ cache.wq, x_cache).reshape(x.shape)  # (..., in)
    dw = fake_quant_backward(dout_2d.T @ xq, cache.w_cache)  # (out, in)
    db = dout_2d.sum(axis=0) if cache.has_bias else None  # (out,)
    return dx, dw, db
