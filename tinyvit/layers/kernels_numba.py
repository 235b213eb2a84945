"""The compiled CPU loops behind :mod:`tinyvit.layers.kernels` (numba), float32 only.

Imported by ``kernels.py`` only, and only when a float32 NumPy array first needs GELU,
LayerNorm or softmax; never given a CuPy array (``kernels._kind`` routes those to CuPy's
own kernels). Each loop is the layer's readable formula written once per element or row,
so one pass over memory does what the array-module formulas do in 5-20 passes.

Three choices make the loops run at SIMD speed without Intel's SVML (which numba would need
to vectorise ``math.exp``/``math.erf``):

- ``exp`` is written out (Cephes ``expf``): ``x = n ln2 + r`` with ``|r| <= ln2/2``,
  ``exp(r)`` a degree-7 polynomial, ``2^n`` put straight into the exponent bits (a bit cast,
  ``_bits_as_float32``). Relative error < 2e-7 on [-87.3, 88.3]; below -87.3 it is 0 (not a subnormal),
  above 88.3 it stays at exp(88.38) = 2.4e38 (the layers never ask for more), NaN stays NaN.
- ``erf`` for the exact GELU is Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7, the formula
  PyTorch's vectorised CPU GELU uses): ``erfc(|z|) = t (a1 + a2 t + .. + a5 t^4) exp(-z^2)``,
  ``t = 1 / (1 + p |z|)``; its ``exp(-z^2) = exp(-x^2 / 2)`` is the same exponential as the
  normal density ``phi(x)`` the backward needs, so the backward costs one ``exp`` too.
- the tanh GELU is ``0.5 x (1 + tanh(u)) = x * sigmoid(2u)`` (one ``exp``, no cancellation).

``error_model="numpy"`` (a division by zero gives inf, not a Python exception: the check
would stop LLVM from vectorising) and ``fastmath`` without ``nnan``/``ninf`` (so NaN and inf
still behave as IEEE says) complete it.

Every function takes ``lo, hi``: the elements (or rows) it owns, so ``kernels.py`` can share
one call out over its thread pool; the loops release the GIL (``nogil``) and are serial, so
there is no second threading runtime to spin against OpenBLAS's threads. Results do not
depend on how the range is split (LayerNorm's ``dw``/``db`` are summed per fixed group of
``LN_GROUP`` rows).

Compiled code is cached on disk (``cache=True``): next to this file in ``__pycache__``, or,
where that is read-only, in numba's per-user cache directory (``NUMBA_CACHE_DIR`` moves it);
where neither can be written the loops are compiled in memory for each process instead.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

# IEEE-safe fast math: reassociate sums (so they vectorise), fuse multiply-adds,
# reciprocal-multiply, ignore the sign of zero, fast approximate libm; NaN and inf are kept.
FASTMATH = frozenset({"reassoc", "contract", "arcp", "nsz", "afn"})
LN_GROUP = 16  # rows per LayerNorm dw/db partial sum: fixed, so the sums do not depend on the thread count

CACHE_ERROR = None  # why compiled code cannot be cached on disk here, or None


def _jit(fn):
    """``numba.njit`` with the settings above; cached on disk where a cache directory is writable."""
    global CACHE_ERROR
    opts = dict(nogil=True, fastmath=set(FASTMATH), error_model="numpy")
    if CACHE_ERROR is None:
        try:
            return numba.njit(cache=True, **opts)(fn)
        except (RuntimeError, OSError) as exc:  # numba found no writable cache location
            CACHE_ERROR = str(exc)
    return numba.njit(cache=False, **opts)(fn)


def _inline(fn):
    return numba.njit(inline="always", fastmath=set(FASTMATH), error_model="numpy")(fn)


@intrinsic
def _bits_as_float32(typingctx, bits):
    """The int32 ``bits`` read as a float32 (a bit cast: how ``2^n`` is built without ``exp2``)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


f32 = np.float32
_LOG2E = f32(1.4426950408889634)
_LN2_HI, _LN2_LO = f32(0.693359375), f32(-2.12194440e-4)  # ln 2 split so n * _LN2_HI is exact
# exp(-87.34) is float32's smallest normal; 88.38 = 127.5 ln 2 keeps 2^n (n <= 127) a finite float32
_EXP_LO, _EXP_HI = f32(-87.33654), f32(88.37626)
# Cephes expf's polynomial: exp(r) = 1 + r + r^2 (c0 + c1 r + ... + c5 r^5) on |r| <= ln2/2
_E0, _E1, _E2 = f32(5.0000001201e-1), f32(1.6666665459e-1), f32(4.1665795894e-2)
_E3, _E4, _E5 = f32(8.3334519073e-3), f32(1.3981999507e-3), f32(1.9875691500e-4)
# Abramowitz & Stegun 7.1.26; _P2 folds in the 1/sqrt(2) of z = x / sqrt(2)
_P2 = f32(0.3275911 * math.sqrt(0.5))
_A1, _A2, _A3, _A4, _A5 = (f32(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))
_INV_SQRT_2PI = f32(1.0 / math.sqrt(2.0 * math.pi))
_TWO_SQRT_2_OVER_PI = f32(2.0 * math.sqrt(2.0 / math.pi))
_SQRT_2_OVER_PI = f32(math.sqrt(2.0 / math.pi))
_TANH_C = f32(0.044715)
_ZERO, _HALF, _ONE, _TWO = f32(0.0), f32(0.5), f32(1.0), f32(2.0)
_NEG_INF = f32(-np.inf)


@_inline
def _exp(x):
    """float32 ``exp(x)``, vectorisable (see the module docstring for the method and its error)."""
    xc = min(max(x, _EXP_LO), _EXP_HI)
    n = np.floor(xc * _LOG2E + _HALF)  # x = n ln2 + r (np.floor stays float32; math.floor would give an int64)
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    p = ((((_E5 * r + _E4) * r + _E3) * r + _E2) * r + _E1) * r + _E0
    y = (p * r * r + r) + _ONE
    y = y * _bits_as_float32(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))  # * 2^n
    y = _ZERO if x < _EXP_LO else y
    return x if x != x else y  # NaN stays NaN


@_inline
def _erfc_abs_and_exp(x):
    """``(erfc(|x| / sqrt 2), exp(-x^2 / 2))`` by A&S 7.1.26: both need the same exponential."""
    t = _ONE / (_ONE + _P2 * abs(x))
    e = _exp(-_HALF * x * x)
    return ((((_A5 * t + _A4) * t + _A3) * t + _A2) * t + _A1) * t * e, e


# ---------------------------------------------------------------- GELU, elementwise over [lo, hi)
@_jit
def gelu_erf(x, out, lo, hi):
    """``out = 0.5 x (1 + erf(x / sqrt 2)) = 0.5 (x + |x| (1 - erfc(|x| / sqrt 2)))``; x, out flat."""
    x, out = x[lo:hi], out[lo:hi]  # sliced, so the index is known >= 0 and the loop vectorises
    for i in range(x.shape[0]):
        v = x[i]
        a = abs(v)
        erfc, _ = _erfc_abs_and_exp(v)
        out[i] = _HALF * (v + (a - a * erfc))


@_jit
def gelu_erf_grad(dout, x, dx, lo, hi):
    """``dx = dout (Phi(x) + x phi(x))``, ``Phi(x) = 0.5 (1 + sign(x) (1 - erfc))``; flat arrays."""
    dout, x, dx = dout[lo:hi], x[lo:hi], dx[lo:hi]
    for i in range(x.shape[0]):
        v = x[i]
        erfc, e = _erfc_abs_and_exp(v)
        half_erf = _HALF - _HALF * erfc  # 0.5 erf(|x| / sqrt 2)
        cdf = _HALF + (half_erf if v >= _ZERO else -half_erf)
        dx[i] = dout[i] * (cdf + v * e * _INV_SQRT_2PI)


@_inline
def _sigmoid_2u(v):
    """``sigmoid(2u) = 0.5 (1 + tanh(u))``, ``u = sqrt(2/pi) (x + 0.044715 x^3)``."""
    return _ONE / (_ONE + _exp(-_TWO_SQRT_2_OVER_PI * (v + _TANH_C * v * v * v)))


@_jit
def gelu_tanh(x, out, lo, hi):
    """``out = 0.5 x (1 + tanh(u)) = x sigmoid(2u)``; flat arrays."""
    x, out = x[lo:hi], out[lo:hi]
    for i in range(x.shape[0]):
        v = x[i]
        out[i] = v * _sigmoid_2u(v)


@_jit
def gelu_tanh_grad(dout, x, dx, lo, hi):
    """``dx = dout (s + 2 x s (1 - s) du/dx)``, s = sigmoid(2u) (as 0.5 (1 + t), 0.5 (1 - t^2) = 2 s (1 - s))."""
    dout, x, dx = dout[lo:hi], x[lo:hi], dx[lo:hi]
    for i in range(x.shape[0]):
        v = x[i]
        s = _sigmoid_2u(v)
        du = _SQRT_2_OVER_PI * (_ONE + f32(3.0) * _TANH_C * v * v)
        dx[i] = dout[i] * (s + _TWO * v * s * (_ONE - s) * du)


# ---------------------------------------------------------------- LayerNorm, rows [lo, hi) of (M, D)
@_jit
def layernorm_rows(x, w, b, eps, out, x_hat, rstd, lo, hi):
    """Per row: mean, biased variance (two passes), ``x_hat = (x - mean) rstd``, ``out = x_hat w + b``."""
    dim = x.shape[1]
    inv_dim = _ONE / f32(dim)
    for i in range(lo, hi):
        s = _ZERO
        for j in range(dim):
            s += x[i, j]
        mean = s * inv_dim
        v = _ZERO
        for j in range(dim):
            c = x[i, j] - mean
            v += c * c
        r = _ONE / math.sqrt(v * inv_dim + eps)
        rstd[i] = r
        for j in range(dim):
            h = (x[i, j] - mean) * r
            x_hat[i, j] = h
            out[i, j] = h * w[j] + b[j]


@_jit
def layernorm_rows_grad(dout, x_hat, rstd, w, dx, dw_parts, db_parts, g_lo, g_hi):
    """Row groups ``[g_lo, g_hi)`` of ``LN_GROUP`` rows: ``dx = rstd (g - mean(g) - x_hat mean(g x_hat))``,
    ``g = dout w``; group ``k``'s share of ``dw = sum dout x_hat`` and ``db = sum dout`` into row k of the parts."""
    rows, dim = dout.shape
    inv_dim = _ONE / f32(dim)
    for k in range(g_lo, g_hi):
        for j in range(dim):
            dw_parts[k, j] = _ZERO
            db_parts[k, j] = _ZERO
        for i in range(k * LN_GROUP, min((k + 1) * LN_GROUP, rows)):
            sg = _ZERO
            sgx = _ZERO
            for j in range(dim):
                d = dout[i, j]
                h = x_hat[i, j]
                g = d * w[j]
                sg += g
                sgx += g * h
                dw_parts[k, j] += d * h
                db_parts[k, j] += d
            mg = sg * inv_dim
            mgx = sgx * inv_dim
            r = rstd[i]
            for j in range(dim):
                dx[i, j] = r * ((dout[i, j] * w[j] - mg) - x_hat[i, j] * mgx)


# ---------------------------------------------------------------- softmax, rows [lo, hi) of (M, N)
_LANES = 16  # the row max is kept in 16 running maxima (one AVX-512 register), merged at the end


@_inline
def _row_max(row, lanes):
    """``max(row)``; ``lanes`` is scratch of ``_LANES`` floats. LLVM does not vectorise a plain
    ``m = max(m, v)`` loop (it must keep NaN semantics), but does the independent lanes."""
    n = row.shape[0]
    body = n - n % _LANES
    for k in range(_LANES):
        lanes[k] = _NEG_INF
    for j0 in range(0, body, _LANES):
        for k in range(_LANES):
            v = row[j0 + k]
            lanes[k] = v if v > lanes[k] else lanes[k]
    m = _NEG_INF
    for k in range(_LANES):
        m = lanes[k] if lanes[k] > m else m
    for j in range(body, n):
        m = row[j] if row[j] > m else m
    return m


@_jit
def softmax_rows(x, out, lo, hi):
    """Per row: ``out = exp(x - max) / sum(exp(x - max))`` (a NaN anywhere in a row makes the row NaN, as the
    reference's; so does a row of all -inf)."""
    n = x.shape[1]
    lanes = np.empty(_LANES, np.float32)
    for i in range(lo, hi):
        row, orow = x[i], out[i]
        m = _row_max(row, lanes)
        s = _ZERO
        for j in range(n):
            e = _exp(row[j] - m)
            orow[j] = e
            s += e
        inv = _ONE / s
        for j in range(n):
            orow[j] *= inv


@_jit
def softmax_rows_grad(dout, s, dx, lo, hi):
    """Per row: ``dx = s (dout - sum(dout s))``."""
    n = s.shape[1]
    for i in range(lo, hi):
        dot = _ZERO
        for j in range(n):
            dot += dout[i, j] * s[i, j]
        for j in range(n):
            dx[i, j] = s[i, j] * (dout[i, j] - dot)


LOOPS = (gelu_erf, gelu_erf_grad, gelu_tanh, gelu_tanh_grad, layernorm_rows, layernorm_rows_grad,
         softmax_rows, softmax_rows_grad)
