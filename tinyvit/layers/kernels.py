"""Faster versions of the elementwise layers whose plain NumPy form is slow, one per backend.

The layers keep their plain formula as the readable reference (``gelu_reference_forward``
in ``gelu.py`` ...); this module only makes the same numbers cheaper, and the tests
(``tests/test_bench_kernels.py``) prove each fast version equal to its reference.

Why GELU: the exact GELU needs ``erf``, and NumPy has none. ``scipy.special.erf`` runs a
scalar double-precision routine per element (about 20 ns), which made the exact GELU
about 40% of a plain NumPy block forward. The CPU path here evaluates erf with the
Abramowitz-Stegun formula 7.1.26, the same one PyTorch's vectorised CPU GELU uses::

    t = 1 / (1 + p |z|)
    erf(|z|) = 1 - (a1 t + a2 t^2 + a3 t^3 + a4 t^4 + a5 t^5) exp(-z^2),   |error| < 1.5e-7

which is below float32's resolution, out of NumPy's SIMD ufuncs (``exp``, ``reciprocal``,
multiply-adds), in place, block by block so every pass stays in the L2 cache. It is
used for float32 only: float64 keeps the exact ``erf``. On CuPy the same layers are one
``ElementwiseKernel`` each (CUDA's own ``erff``/``tanhf``).

The blocks are shared out over a small thread pool (NumPy's ufuncs release the GIL), as
PyTorch runs its elementwise kernels on its intra-op threads; ``TINYVIT_THREADS`` sets
how many (default: the cores this process may use, at most 8).

Set ``TINYVIT_FUSED=0`` to run the plain references everywhere (the benchmarks do, to
time both).

Every function returns ``None`` when it has no fast path for its input (float64, an
array namespace other than NumPy or CuPy, or ``TINYVIT_FUSED=0``); the caller then runs
the reference.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np

from ..backend import array_module

# Abramowitz & Stegun 7.1.26; P2 folds in the 1/sqrt(2) of z = x / sqrt(2).
_P2 = 0.3275911 * math.sqrt(0.5)
_A1, _A2, _A3, _A4, _A5 = 0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_C = 0.044715

BLOCK = 1 << 16  # elements per block: 256 KiB of float32, so a block's 4-5 buffers sit in L2 (measured best)


def enabled() -> bool:
    """False when ``TINYVIT_FUSED=0`` asks for the plain reference layers."""
    return os.environ.get("TINYVIT_FUSED", "1") != "0"


def _kind(x):
    """``"numpy"``/``"cupy"`` when a fast path exists for ``x``, else None."""
    if not enabled() or x.dtype != np.float32:
        return None
    xp = array_module(x)
    if xp is np:
        return "numpy"
    if xp.__name__ == "cupy":
        return "cupy"
    return None


def _blocks(*arrays):
    """Flat views of C-contiguous copies of ``arrays``, and the block slices to walk them."""
    flats = [np.ascontiguousarray(a).reshape(-1) for a in arrays]
    return flats, [slice(i, i + BLOCK) for i in range(0, flats[0].size, BLOCK)]


def threads() -> int:
    """Worker threads for the CPU kernels: ``TINYVIT_THREADS``, else the cores this process may use."""
    wanted = os.environ.get("TINYVIT_THREADS", "")
    if wanted.isdigit() and int(wanted) > 0:
        return int(wanted)
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:  # not on Linux
        return max(1, min(os.cpu_count() or 1, 8))


@functools.lru_cache(maxsize=None)
def _pool(workers: int):
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(workers, thread_name_prefix="tinyvit-kernel")


def _for_blocks(blocks, work) -> None:
    """Run ``work(block_slices, t, e)`` over contiguous groups of blocks, one group per thread.

    NumPy's ufuncs release the GIL, so the groups run in parallel; each thread gets its
    own two scratch buffers ``t``, ``e`` of one block.
    """
    def group(part):
        t = np.empty(BLOCK, np.float32)
        e = np.empty(BLOCK, np.float32)
        work(part, t, e)

    n = min(threads(), len(blocks))
    if n <= 1:
        group(blocks)
        return
    parts = [blocks[i::n] for i in range(n)]
    for future in [_pool(n).submit(group, part) for part in parts]:
        future.result()


def _erfc_abs_times(x, t, e, out):
    """``out = erfc(|x| / sqrt 2)`` (A&S 7.1.26), leaving ``e = exp(-x^2 / 2)``; ``t`` is scratch."""
    np.abs(x, out=t)
    t *= _P2
    t += 1.0
    np.reciprocal(t, out=t)  # t = 1 / (1 + p |z|)
    np.multiply(t, _A5, out=out)
    out += _A4
    out *= t
    out += _A3
    out *= t
    out += _A2
    out *= t
    out += _A1
    out *= t  # (a1 t + ... + a5 t^5)
    np.square(x, out=e)
    e *= -0.5
    np.exp(e, out=e)  # exp(-z^2), z^2 = x^2 / 2
    out *= e  # erfc(|z|)


# ---------------------------------------------------------------- GELU
def gelu_forward(x, approximate: str):
    """``x: (...) -> out: (...)`` float32 GELU, or None if there is no fast path for ``x``."""
    kind = _kind(x)
    if kind == "cupy":
        return _cupy_kernels(array_module(x))[f"gelu_{approximate}"](x)
    if kind is None:
        return None
    (xf,), blocks = _blocks(x)
    out = np.empty_like(xf)

    def work(part, t, e):
        for s in part:
            xs, o = xf[s], out[s]
            ts, es = t[: xs.size], e[: xs.size]
            if approximate == "none":
                # 0.5 x (1 + erf(z)) = 0.5 (x + |x| - |x| erfc(|z|))
                _erfc_abs_times(xs, ts, es, o)
                np.abs(xs, out=es)
                o *= es
                np.subtract(es, o, out=o)
            else:
                # 0.5 x (1 + tanh(sqrt(2/pi) (x + c x^3)))
                np.square(xs, out=ts)
                ts *= _TANH_C
                ts += 1.0
                ts *= xs
                ts *= _SQRT_2_OVER_PI
                np.tanh(ts, out=o)
                o *= xs
            o += xs
            o *= 0.5

    _for_blocks(blocks, work)
    return out.reshape(x.shape)


def gelu_backward(dout, x, approximate: str):
    """``dout, x: (...) -> dx = dout * gelu'(x)``, float32, or None if there is no fast path."""
    kind = _kind(x)
    if kind is not None and dout.dtype != np.float32:
        kind = None
    if kind == "cupy":
        return _cupy_kernels(array_module(x))[f"gelu_{approximate}_backward"](dout, x)
    if kind is None:
        return None
    (xf, df), blocks = _blocks(x, dout)
    out = np.empty_like(xf)
    _for_blocks(blocks, lambda part, t, e: _gelu_backward_blocks(part, xf, df, out, t, e, approximate))
    return out.reshape(x.shape)


def _gelu_backward_blocks(part, xf, df, out, t, e, approximate):
    for s in part:
        xs, ds, o = xf[s], df[s], out[s]
        ts, es = t[: xs.size], e[: xs.size]
        if approximate == "none":
            # Phi(x) + x phi(x), Phi(x) = 0.5 + sign(x) (0.5 - 0.5 erfc(|z|)), phi(x) = exp(-x^2/2) / sqrt(2 pi)
            _erfc_abs_times(xs, ts, es, o)
            o *= -0.5
            o += 0.5
            np.copysign(o, xs, out=o)
            o += 0.5
            es *= xs
            es *= _INV_SQRT_2PI
            o += es
        else:
            # 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 c x^2),  t = tanh(sqrt(2/pi) (x + c x^3))
            np.square(xs, out=es)
            np.multiply(es, _TANH_C, out=ts)
            ts += 1.0
            ts *= xs
            ts *= _SQRT_2_OVER_PI
            np.tanh(ts, out=ts)  # t
            es *= 3.0 * _TANH_C
            es += 1.0
            es *= _SQRT_2_OVER_PI
            es *= xs  # x sqrt(2/pi) (1 + 3 c x^2)
            np.square(ts, out=o)
            np.subtract(1.0, o, out=o)
            o *= es  # x (1 - t^2) du/dx
            o += ts
            o += 1.0
            o *= 0.5
        o *= ds


@functools.lru_cache(maxsize=None)
def _cupy_kernels(cupy) -> dict:
    """The CuPy ``ElementwiseKernel``s, built once per process (CuPy caches the compiled code)."""
    k = cupy.ElementwiseKernel
    return {
        "gelu_none": k("float32 x", "float32 y", "y = 0.5f * x * (1.0f + erff(x * 0.70710678118654752f))",
                       "tinyvit_gelu_none"),
        "gelu_tanh": k("float32 x", "float32 y",
                       "y = 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)))",
                       "tinyvit_gelu_tanh"),
        "gelu_none_backward": k(
            "float32 d, float32 x", "float32 dx",
            "dx = d * (0.5f * (1.0f + erff(x * 0.70710678118654752f))"
            " + x * expf(-0.5f * x * x) * 0.39894228040143268f)",
            "tinyvit_gelu_none_backward"),
        "gelu_tanh_backward": k(
            "float32 d, float32 x", "float32 dx",
            "float t = tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x));"
            "dx = d * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t)"
            " * 0.79788456080286536f * (1.0f + 3.0f * 0.044715f * x * x))",
            "tinyvit_gelu_tanh_backward"),
    }
