"""GELU: ``x * Phi(x)``, with ``Phi`` the standard normal CDF.

Derivation: docs/gelu.md (the learners' tour: examples/04_forward_backward.py)

Exact (PyTorch's default, ``approximate="none"``)::

    out  = 0.5 * x * (1 + erf(x / sqrt(2)))
    dout/dx = Phi(x) + x * phi(x) = 0.5 * (1 + erf(x / sqrt(2))) + x * exp(-x^2 / 2) / sqrt(2 pi)

Tanh approximation (``approximate="tanh"``, as ``torch.nn.GELU(approximate="tanh")``)::

    u = sqrt(2 / pi) * (x + 0.044715 x^3),   t = tanh(u)
    out  = 0.5 * x * (1 + t)
    dout/dx = 0.5 * (1 + t) + 0.5 * x * (1 - t^2) * sqrt(2 / pi) * (1 + 3 * 0.044715 x^2)

The backward recomputes from the cached input ``x`` rather than caching ``Phi(x)``
as well: one array cached instead of two, for one more erf/tanh in the backward.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from . import kernels
from ..backend import array_module, erf

APPROXIMATIONS = ("none", "tanh")
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_C = 0.044715


class GeluCache(NamedTuple):
    x: object  # (...): the input; the derivative is a function of it alone
    approximate: str


def gelu_forward(x, approximate: str = "none"):
    """``x: (...) -> out: (...)``, same shape and dtype; cache: x.

    float32 runs the fused kernel of :mod:`tinyvit.layers.kernels` (equal to the reference below
    within float32 rounding, ``tests/test_bench_kernels.py``); otherwise the reference.
    """
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    out = kernels.gelu_forward(x, approximate)
    if out is None:
        out = gelu_reference_forward(x, approximate)
    return out, GeluCache(x, approximate)


def gelu_backward(dout, cache: GeluCache):
    """``dout: (...) -> dx: (...)``; the fused kernel for float32, else the reference."""
    dx = kernels.gelu_backward(dout, cache.x, cache.approximate)
    return gelu_reference_backward(dout, cache) if dx is None else dx


def gelu_reference_forward(x, approximate: str = "none"):
    """The plain formula: ``x: (...) -> out: (...)``."""
    if approximate == "none":
        return 0.5 * x * (1.0 + erf(x * _SQRT_HALF))
    xp = array_module(x)
    return 0.5 * x * (1.0 + xp.tanh(_SQRT_2_OVER_PI * (x + _TANH_C * x * x * x)))


def gelu_reference_backward(dout, cache: GeluCache):
    """The plain formula: ``dout: (...) -> dx: (...)``."""
    x, approximate = cache
    xp = array_module(x)
    if approximate == "none":
        cdf = 0.5 * (1.0 + erf(x * _SQRT_HALF))  # Phi(x)
        pdf = xp.exp(-0.5 * x * x) * _INV_SQRT_2PI  # phi(x)
        return dout * (cdf + x * pdf)
    t = xp.tanh(_SQRT_2_OVER_PI * (x + _TANH_C * x * x * x))
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_C * x * x)
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx)
