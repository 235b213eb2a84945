"""Faster versions of the elementwise layers whose plain array-module form is slow, one per backend.

The layers keep their plain formula as the readable reference (``gelu_reference_forward``
in ``gelu.py``, the bodies of ``layernorm_forward``/``softmax_forward`` ...); this module only
makes the same numbers cheaper, and the tests (``tests/test_bench_kernels.py``,
``tests/test_kernels_numba.py``) prove each fast version equal to its reference.

Which version runs is decided here, in :func:`path` (``tinyvit info`` prints it), for float32
only (float64 always runs the references):

- ``numba``: a float32 NumPy array, with numba installed (a default dependency). GELU,
  LayerNorm and softmax, forward and backward, are loops compiled by numba
  (:mod:`tinyvit.layers.kernels_numba`): one pass over memory per layer, SIMD, with a
  polynomial ``exp``/``erf``; shared out over the thread pool below.
- ``numpy``: a float32 NumPy array without numba (or ``TINYVIT_NUMBA=0``): GELU from NumPy's
  SIMD ufuncs, block by block (below); LayerNorm and softmax run their references.
- ``cupy``: CuPy arrays get CuPy's own ``ElementwiseKernel`` for GELU (CUDA's ``erff``/``tanhf``);
  LayerNorm and softmax run their (CuPy) references. A CuPy array never reaches numba.
- ``reference``: ``TINYVIT_FUSED=0``, float64, or any other array type (the tests' strict arrays).

The NumPy-block GELU: the exact GELU needs ``erf``, and NumPy has none. ``scipy.special.erf`` runs a
scalar double-precision routine per element (about 20 ns), which made the exact GELU
about 40% of a plain NumPy block forward. This path evaluates erf with the
Abramowitz-Stegun formula 7.1.26, the same one PyTorch's vectorised CPU GELU uses::

    t = 1 / (1 + p |z|)
    erf(|z|) = 1 - (a1 t + a2 t^2 + a3 t^3 + a4 t^4 + a5 t^5) exp(-z^2),   |error| < 1.5e-7

which is below float32's resolution, out of NumPy's SIMD ufuncs (``exp``, ``reciprocal``,
multiply-adds), in place, block by block so every pass stays in the L2 cache.

The work is shared out over a small thread pool (numba's loops and NumPy's ufuncs release the
GIL; the pool's idle threads sleep, so they never spin against OpenBLAS's), as PyTorch runs its
elementwise kernels on its intra-op threads; ``TINYVIT_THREADS`` sets how many (default: the
cores this process may use, at most 8).

Every function returns ``None`` when it has no fast path for its input; the caller then runs
the reference.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import threading

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


NUMBA_ERROR = None  # why numba cannot be used here (not installed, failed to import), or None


@functools.lru_cache(maxsize=None)
def _import_numba_loops():
    global NUMBA_ERROR
    try:
        from . import kernels_numba
    except Exception as exc:  # ImportError, or a numba/llvmlite that fails to load on this machine
        NUMBA_ERROR = f"{type(exc).__name__}: {exc}"
        return None
    return kernels_numba


def _numba_loops():
    """The compiled loops (:mod:`kernels_numba`), or None without numba or with ``TINYVIT_NUMBA=0``."""
    if os.environ.get("TINYVIT_NUMBA", "1") == "0":
        return None
    return _import_numba_loops()


def path(xp=np, dtype="float32") -> str:
    """The one place that picks a version: ``"numba"``, ``"numpy"``, ``"cupy"`` or ``"reference"``.

    For arrays of module ``xp`` and ``dtype`` (see the module docstring for what each runs).
    """
    if not enabled() or np.dtype(dtype) != np.float32:
        return "reference"
    if xp is np:
        return "numba" if _numba_loops() is not None else "numpy"
    if getattr(xp, "__name__", "") == "cupy":
        return "cupy"
    return "reference"


def describe() -> str:
    """One line for ``tinyvit info``: which CPU path float32 GELU/LayerNorm/softmax take, and why."""
    kind = path()
    if kind == "numba":
        loops = _numba_loops()
        import numba

        cache = f"compiled code cached in {cache_dir()}" if loops.CACHE_ERROR is None else \
            f"compiled code not cached ({loops.CACHE_ERROR})"
        return (f"numba {numba.__version__} loops for GELU, LayerNorm, softmax (forward and backward), "
                f"{threads()} threads; {cache}")
    why = {"reference": "TINYVIT_FUSED=0: the plain array-module formulas",
           "numpy": "NumPy-block GELU; LayerNorm and softmax plain formulas ("
                    + ("TINYVIT_NUMBA=0" if os.environ.get("TINYVIT_NUMBA", "1") == "0" else
                       f"numba unavailable: {NUMBA_ERROR}; pip install numba") + ")"}
    return why[kind]


def cache_dir() -> str | None:
    """Where numba keeps the compiled loops (None when not cached, or numba is not in use)."""
    loops = _numba_loops()
    if loops is None or loops.CACHE_ERROR is not None:
        return None
    return loops.gelu_erf.stats.cache_path


def _kind(x):
    """``"numba"``/``"numpy"``/``"cupy"`` when a fast path exists for ``x``, else None."""
    if not enabled() or getattr(x, "dtype", None) != np.float32:
        return None
    if isinstance(x, np.ndarray):
        return path(np)
    xp = array_module(x)
    if xp.__name__ == "cupy":
        return "cupy"
    return None


def _kind_all(*arrays):
    """The common kind of several arrays: ``_kind`` of each, None unless all agree."""
    kinds = {_kind(a) for a in arrays}
    return kinds.pop() if len(kinds) == 1 else None


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


MIN_ELEMENTS = 1 << 15  # elements per chunk of work: ~10 us of GELU, against ~2 us to hand a chunk out
MAX_CHUNKS = 64  # larger arrays get larger chunks
MIN_MACS = 1 << 21  # multiply-adds per chunk of a stack of products: ~50 us on one core


class _Chunks:
    """``loop(*args, lo, hi)`` over ``[0, total)`` in chunks that whichever thread is free takes next.

    Dynamic, not one fixed part per thread: on a busy machine a pool thread may not be scheduled for
    a whole time slice (ms), and a fixed split would make the caller wait for it; here the caller
    simply takes the chunks that thread has not started. A chunk is run by exactly one thread, and a
    chunk's result does not depend on which, so the output does not either.
    """

    def __init__(self, loop, args, total: int, chunk: int):
        self.loop, self.args = loop, args
        self.bounds = list(range(0, total, chunk)) + [total]
        self.claim = itertools.count()  # next(...) is atomic under the GIL
        self.left = len(self.bounds) - 1
        self.error = None
        self.done = threading.Condition()

    def run(self) -> None:
        n, ran = len(self.bounds) - 1, 0
        try:
            while (i := next(self.claim)) < n:
                ran += 1
                self.loop(*self.args, self.bounds[i], self.bounds[i + 1])
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by wait()
            self.error = exc
        finally:
            if ran:
                with self.done:
                    self.left -= ran
                    self.done.notify_all()

    def wait(self) -> None:
        with self.done:
            while self.left:
                self.done.wait()
        if self.error is not None:
            raise self.error


def _share(loop, args, total: int, min_per_part: int) -> None:
    """Run ``loop(*args, lo, hi)`` over ``[0, total)`` on the calling thread and up to ``threads() - 1``
    pool threads, in chunks of at least ``min_per_part`` (see :class:`_Chunks`)."""
    workers = threads()
    chunk = max(min_per_part, 1, -(-total // MAX_CHUNKS))
    if workers <= 1 or total <= chunk:
        loop(*args, 0, total)
        return
    work = _Chunks(loop, args, total, chunk)
    helpers = min(workers - 1, len(work.bounds) - 2)
    pool = _pool(workers - 1)
    for _ in range(helpers):
        pool.submit(work.run)
    work.run()
    work.wait()


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
    if kind == "numba":
        loops = _numba_loops()
        xf = np.ascontiguousarray(x).reshape(-1)
        out = np.empty_like(xf)
        _share(loops.gelu_erf if approximate == "none" else loops.gelu_tanh, (xf, out), xf.size, MIN_ELEMENTS)
        return out.reshape(x.shape)
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
    kind = _kind_all(x, dout)
    if kind == "cupy":
        return _cupy_kernels(array_module(x))[f"gelu_{approximate}_backward"](dout, x)
    if kind == "numba":
        loops = _numba_loops()
        xf, df = np.ascontiguousarray(x).reshape(-1), np.ascontiguousarray(dout).reshape(-1)
        dx = np.empty_like(xf)
        _share(loops.gelu_erf_grad if approximate == "none" else loops.gelu_tanh_grad, (df, xf, dx), xf.size,
               MIN_ELEMENTS)
        return dx.reshape(x.shape)
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


# ---------------------------------------------------------------- LayerNorm
def layernorm_forward(x, w, b, eps: float):
    """``x: (..., D), w: (D,), b: (D,) -> (out (..., D), x_hat (..., D), rstd (..., 1))``, float32,
    the values ``layernorm.layernorm_forward`` computes and caches; None if there is no fast path."""
    if _kind_all(x, w, b) != "numba":
        return None
    loops = _numba_loops()
    dim = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, dim)  # (M, D)
    out, x_hat = np.empty_like(x2), np.empty_like(x2)
    rstd = np.empty(x2.shape[0], np.float32)  # (M,)
    _share(loops.layernorm_rows, (x2, np.ascontiguousarray(w), np.ascontiguousarray(b), np.float32(eps), out,
                                  x_hat, rstd), x2.shape[0], max(1, MIN_ELEMENTS // max(dim, 1)))
    shape = x.shape
    return out.reshape(shape), x_hat.reshape(shape), rstd.reshape(*shape[:-1], 1)


def layernorm_backward(dout, x_hat, rstd, w):
    """``dout: (..., D)`` and the forward's ``x_hat, rstd (..., 1), w`` -> ``dx (..., D), dw (D,), db (D,)``
    (float32), or None if there is no fast path."""
    if _kind_all(dout, x_hat, rstd, w) != "numba":
        return None
    loops = _numba_loops()
    dim = x_hat.shape[-1]
    d2 = np.ascontiguousarray(dout).reshape(-1, dim)  # (M, D)
    h2 = np.ascontiguousarray(x_hat).reshape(-1, dim)
    r1 = np.ascontiguousarray(rstd).reshape(-1)  # (M,)
    groups = -(-d2.shape[0] // loops.LN_GROUP)
    dx = np.empty_like(d2)
    dw_parts = np.empty((groups, dim), np.float32)  # one partial sum per group of rows:
    db_parts = np.empty((groups, dim), np.float32)  # the same sums whatever the thread count
    _share(loops.layernorm_rows_grad, (d2, h2, r1, np.ascontiguousarray(w), dx, dw_parts, db_parts), groups,
           max(1, MIN_ELEMENTS // max(dim * loops.LN_GROUP, 1)))
    return dx.reshape(x_hat.shape), dw_parts.sum(axis=0), db_parts.sum(axis=0)


# ---------------------------------------------------------------- softmax
def softmax_forward(x):
    """``x: (..., N) -> softmax over the last axis (..., N)``, float32, or None if there is no fast path."""
    if _kind(x) != "numba":
        return None
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (M, N)
    out = np.empty_like(x2)
    _share(_numba_loops().softmax_rows, (x2, out), x2.shape[0], max(1, MIN_ELEMENTS // max(x2.shape[1], 1)))
    return out.reshape(x.shape)


def softmax_backward(dout, s):
    """``dout, s: (..., N) -> dx = s (dout - sum(dout s))`` row by row, float32, or None if there is no fast path."""
    if _kind_all(dout, s) != "numba":
        return None
    n = s.shape[-1]
    d2, s2 = np.ascontiguousarray(dout).reshape(-1, n), np.ascontiguousarray(s).reshape(-1, n)
    dx = np.empty_like(s2)
    _share(_numba_loops().softmax_rows_grad, (d2, s2, dx), s2.shape[0], max(1, MIN_ELEMENTS // max(n, 1)))
    return dx.reshape(s.shape)


# ---------------------------------------------------------------- stacks of small matrix products
@functools.lru_cache(maxsize=None)
def _blas_libraries() -> tuple:
    """threadpoolctl's handles on the loaded BLAS libraries (OpenBLAS of NumPy, SciPy), or () without it."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return ()
    return tuple(c for c in ThreadpoolController().lib_controllers if c.user_api == "blas")


def stack_matmul(a, b, out=None):
    """``a: (S, ..., n, k) @ b: (S, ..., k, m) -> (S, ..., n, m)`` for NumPy stacks of small products
    (the attention's ``q k^T``, ``att v`` and their gradients), or None where this does not apply.

    NumPy runs a stack as one BLAS call per matrix, and a multi-threaded BLAS splits each small
    product over its threads and makes them meet at the end of every one: 24 meetings per product
    at ViT-Ti/16 b8 and, on a busy machine, a time slice lost whenever one thread is not scheduled.
    Here the stack is split over the kernels' pool instead (chunks along the first axis, or the
    second when the first is 1), each product on one BLAS thread: one meeting per stack.
    ``out`` may be a strided view (dq, dk, dv written into dqkv's slots).
    """
    if (not enabled() or not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray) or a.ndim < 3
            or a.shape[:-2] != b.shape[:-2] or threads() <= 1 or os.environ.get("TINYVIT_STACK_MATMUL") == "0"):
        return None
    axis = 0 if a.shape[0] > 1 else 1 if a.ndim > 3 and a.shape[1] > 1 else None
    blas = _blas_libraries()
    if axis is None or not blas:
        return None
    n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
    macs_per_index = math.prod(a.shape[axis + 1:-2]) * n * k * m  # one index of the split axis
    chunk = -(-MIN_MACS // max(macs_per_index, 1))
    if a.shape[axis] < 2 * chunk:  # too little work to share: NumPy's own loop is cheaper
        return None
    if out is None:
        out = np.empty((*a.shape[:-1], b.shape[-1]), np.result_type(a, b))

    def products(lo, hi):
        part = (slice(lo, hi),) if axis == 0 else (slice(None), slice(lo, hi))
        np.matmul(a[part], b[part], out=out[part])

    with _one_blas_thread(blas):
        _share(products, (), a.shape[axis], chunk)
    return out


_BLAS_LOCK = threading.Lock()
_BLAS_STATE = {"depth": 0, "saved": None}  # callers inside stack_matmul now; the thread counts to give back


@contextlib.contextmanager
def _one_blas_thread(blas):
    """BLAS on one thread while any thread is inside; the first in saves the counts, the last out restores
    them (so two Python threads in attention at once cannot leave BLAS on one thread). The setting is
    process-wide: BLAS called from another thread meanwhile runs on one thread too."""
    with _BLAS_LOCK:
        if _BLAS_STATE["depth"] == 0:
            _BLAS_STATE["saved"] = [lib.num_threads for lib in blas]
            for lib in blas:
                lib.set_num_threads(1)
        _BLAS_STATE["depth"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_STATE["depth"] -= 1
            if _BLAS_STATE["depth"] == 0:
                for lib, n in zip(blas, _BLAS_STATE["saved"]):
                    lib.set_num_threads(n)


def matmul(a, b, out=None):
    """``a @ b`` (into ``out`` if given), with :func:`stack_matmul` for NumPy stacks; any array module."""
    result = stack_matmul(a, b, out)
    if result is not None:
        return result
    return a @ b if out is None else array_module(a).matmul(a, b, out=out)


def compile_all() -> float:
    """Compile (or load from the cache) every numba loop now; the seconds it took (0.0 without numba)."""
    import time

    if _numba_loops() is None:
        return 0.0
    start = time.perf_counter()
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
    w = np.ones(4, np.float32)
    for approximate in ("none", "tanh"):
        gelu_backward(x, x, approximate)
        gelu_forward(x, approximate)
    _, x_hat, rstd = layernorm_forward(x, w, w, 1e-6)
    layernorm_backward(x, x_hat, rstd, w)
    softmax_backward(x, softmax_forward(x))
    return time.perf_counter() - start


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
