"""The compiled CPU loops (tinyvit.layers.kernels_numba, picked by tinyvit.layers.kernels.path) equal the
readable references they replace: GELU (exact and tanh), LayerNorm and softmax, forward and backward.

Oracle: the same layer in float64, which always runs the array-module formula. Tolerance: the float32
row of tests/tolerances.py (what every float32 comparison in the suite uses). The loops' own errors are
far below it (measured: GELU 2e-7 forward / 1.3e-6 backward, LayerNorm 1e-6, softmax 4e-7); the test of
the GELU kernels' tighter bound is tests/test_bench_kernels.py.
"""
import sys

import numpy as np
import pytest

from tinyvit.layers import attention, gelu, kernels, layernorm
from tests.strict_array import strict_xp
from tests.tolerances import TOLERANCES, assert_close

numba = pytest.importorskip("numba", reason="numba is a default dependency; the fast path needs it")
F32 = TOLERANCES["float32"]


@pytest.fixture(autouse=True)
def _numba_on(monkeypatch):
    monkeypatch.delenv("TINYVIT_FUSED", raising=False)
    monkeypatch.delenv("TINYVIT_NUMBA", raising=False)
    assert kernels.path() == "numba", kernels.describe()


def _data(shape, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    flat = x.reshape(-1)
    flat[:8] = [0.0, -0.0, 9.0, -9.0, 40.0, -40.0, 1e-30, -90.0][: flat.size]  # zero, tails, tiny, exp underflow
    return x, rng.standard_normal(shape).astype(np.float32)


def _f64(*arrays):
    return [a.astype(np.float64) for a in arrays]


SHAPES = [(7,), (2, 5, 33), (3, 197, 70), (2, kernels.MIN_ELEMENTS // 3 + 5, 3)]  # the last: several threads


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gelu(approximate, shape):
    x, dout = _data(shape)
    out, cache = gelu.gelu_forward(x, approximate)
    dx = gelu.gelu_backward(dout, cache)
    ref, cache64 = gelu.gelu_forward(*_f64(x), approximate)
    assert out.dtype == dx.dtype == np.float32 and out.shape == dx.shape == x.shape
    assert_close("gelu forward", out, ref, **F32)
    assert_close("gelu backward", dx, gelu.gelu_backward(*_f64(dout), cache64), **F32)
    np.testing.assert_array_equal(out, kernels.gelu_forward(x, approximate))  # the layer took the loop


@pytest.mark.parametrize("shape", [(5, 4), (2, 197, 192), (3, 50, 768), (1, 1)])
def test_layernorm(shape):
    x, dout = _data(shape)
    x = x * 2.0 + 0.5
    rng = np.random.default_rng(1)
    w = (1.0 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    b = rng.standard_normal(shape[-1]).astype(np.float32)
    out, cache = layernorm.layernorm_forward(x, w, b, 1e-6)
    grads = layernorm.layernorm_backward(dout, cache)
    ref, cache64 = layernorm.layernorm_forward(*_f64(x, w, b), 1e-6)
    grads64 = layernorm.layernorm_backward(*_f64(dout), cache64)
    assert out.dtype == np.float32 and cache.rstd.shape == cache64.rstd.shape == (*shape[:-1], 1)
    assert_close("layernorm forward", out, ref, **F32)
    assert_close("layernorm x_hat (cached)", cache.x_hat, cache64.x_hat, **F32)
    assert_close("layernorm rstd (cached)", cache.rstd, cache64.rstd, **F32)
    for name, g, g64 in zip(("dx", "dw", "db"), grads, grads64):
        assert g.dtype == np.float32 and g.shape == g64.shape
        assert_close(f"layernorm {name}", g, g64, **F32)
    assert kernels.layernorm_forward(x, w, b, 1e-6) is not None  # the layer took the loop


@pytest.mark.parametrize("shape", [(3,), (2, 3, 197, 197), (4, 17), (2, 2, 5, 16)])
def test_softmax(shape):
    x, dout = _data(shape)
    out, cache = attention.softmax_forward(x)
    dx = attention.softmax_backward(dout, cache)
    ref, cache64 = attention.softmax_forward(*_f64(x))
    assert out.dtype == dx.dtype == np.float32
    assert_close("softmax forward", out, ref, **F32)
    assert_close("softmax backward", dx, attention.softmax_backward(*_f64(dout), cache64), **F32)
    np.testing.assert_array_equal(out, kernels.softmax_forward(x))


def test_softmax_masked_and_nan_rows_as_the_reference():
    x = np.zeros((4, 6), np.float32)
    x[0, 2:] = -np.inf  # masked keys get probability 0
    x[1, 3] = np.nan  # a NaN spreads over its row
    x[2] = -np.inf  # nothing to attend to: NaN, as the formula gives
    x[3] = [1000.0, 999.0, -1000.0, 0.0, 3.0, 1000.0]  # large logits: max-subtracted, no overflow
    out = kernels.softmax_forward(x)
    with np.errstate(invalid="ignore"):
        ref = attention.softmax_forward(x.astype(np.float64))[0]
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    ok = ~np.isnan(ref)
    assert_close("softmax edge rows", out[ok], ref[ok], **F32)
    assert out[0, 2:].tolist() == [0.0] * 4


def test_gelu_nan_stays_nan_and_tails_are_exact():
    x = np.array([np.nan, -200.0, -30.0, 30.0, 200.0], np.float32)
    for approximate in ("none", "tanh"):
        out = kernels.gelu_forward(x, approximate)
        dx = kernels.gelu_backward(np.ones_like(x), x, approximate)
        assert np.isnan(out[0]) and np.isnan(dx[0])
        np.testing.assert_allclose(out[1:], [0.0, 0.0, 30.0, 200.0], atol=1e-6)
        np.testing.assert_allclose(dx[1:], [0.0, 0.0, 1.0, 1.0], atol=1e-6)


def test_strided_inputs_are_read_right_and_left_untouched():
    x, dout = _data((6, 40, 9))
    xs, ds = x[::2, ::-3], dout[1::2, ::3]  # non-contiguous, negative strides
    keep = xs.copy(), ds.copy()
    w = np.linspace(0.5, 1.5, xs.shape[-1], dtype=np.float32)
    out, cache = layernorm.layernorm_forward(xs, w, w, 1e-5)
    layernorm.layernorm_backward(ds, cache)
    s, scache = attention.softmax_forward(xs)
    attention.softmax_backward(ds, scache)
    np.testing.assert_array_equal(xs, keep[0])
    np.testing.assert_array_equal(ds, keep[1])
    assert_close("strided layernorm", out, layernorm.layernorm_forward(*_f64(keep[0], w, w), 1e-5)[0], **F32)
    assert_close("strided softmax", s, attention.softmax_forward(*_f64(keep[0]))[0], **F32)


def test_the_same_bits_on_any_number_of_threads(monkeypatch):
    x, dout = _data((9, 197, 192), scale=1.0)  # LayerNorm's dw/db: partial sums per fixed group of rows
    w = np.linspace(0.5, 1.5, 192, dtype=np.float32)
    results = []
    for n in ("1", "2", "3"):
        monkeypatch.setenv("TINYVIT_THREADS", n)
        out, cache = layernorm.layernorm_forward(x, w, w, 1e-6)
        s, scache = attention.softmax_forward(x)
        results.append([out, *layernorm.layernorm_backward(dout, cache), s, attention.softmax_backward(dout, scache),
                        kernels.gelu_forward(x, "none"), kernels.gelu_backward(dout, x, "tanh")])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_float64_and_other_arrays_never_reach_numba():
    x, dout = _data((3, 8))
    w = np.ones(8, np.float32)
    assert kernels.layernorm_forward(x.astype(np.float64), w, w, 1e-6) is None
    assert kernels.layernorm_forward(x, w.astype(np.float64), w, 1e-6) is None  # mixed dtypes: the reference
    assert kernels.softmax_forward(x.astype(np.float64)) is None
    assert kernels.path(dtype="float64") == "reference"
    xp = strict_xp  # a device-like array type (as CuPy's): the reference, never the CPU loop
    xs, ws = xp.asarray(x), xp.asarray(w)
    assert kernels.softmax_forward(xs) is None and kernels.layernorm_forward(xs, ws, ws, 1e-6) is None
    assert kernels.gelu_forward(xs, "none") is None
    out, _ = attention.softmax_forward(xs)
    assert_close("strict softmax", xp.to_host(out), attention.softmax_forward(x.astype(np.float64))[0], **F32)


def test_switches_pick_the_path_in_one_place(monkeypatch):
    x, _ = _data((4, 10))
    monkeypatch.setenv("TINYVIT_NUMBA", "0")
    assert kernels.path() == "numpy" and "TINYVIT_NUMBA=0" in kernels.describe()
    assert kernels.softmax_forward(x) is None and kernels.gelu_forward(x, "none") is not None  # NumPy blocks
    monkeypatch.setenv("TINYVIT_FUSED", "0")
    assert kernels.path() == "reference" and kernels.gelu_forward(x, "none") is None


def test_without_numba_the_layers_fall_back(monkeypatch):
    """A machine where numba cannot be imported gets the NumPy-block GELU and the references, and says why."""
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    monkeypatch.delitem(sys.modules, "tinyvit.layers.kernels_numba")
    monkeypatch.delattr(sys.modules["tinyvit.layers"], "kernels_numba")
    monkeypatch.setattr(kernels, "NUMBA_ERROR", None)
    kernels._import_numba_loops.cache_clear()
    try:
        assert kernels.path() == "numpy"
        assert "numba unavailable" in kernels.describe() and "pip install numba" in kernels.describe()
        x, _ = _data((3, 11))
        out, _ = attention.softmax_forward(x)
        assert_close("fallback softmax", out, attention.softmax_forward(x.astype(np.float64))[0], **F32)
    finally:
        kernels._import_numba_loops.cache_clear()


def test_no_writable_cache_compiles_in_memory(monkeypatch):
    """numba raises when no cache directory can be written (a read-only install, no home): compile uncached."""
    from tinyvit.layers import kernels_numba

    real_njit = numba.njit

    def njit(*args, cache=False, **kw):
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available for file '/ro/f.py'")
        return real_njit(*args, **kw)

    monkeypatch.setattr(kernels_numba, "CACHE_ERROR", None)
    monkeypatch.setattr(kernels_numba.numba, "njit", njit)

    def twice(x, out, lo, hi):
        for i in range(lo, hi):
            out[i] = 2 * x[i]

    loop = kernels_numba._jit(twice)
    assert "no locator" in kernels_numba.CACHE_ERROR
    x = np.arange(5, dtype=np.float32)
    out = np.empty_like(x)
    loop(x, out, 0, 5)
    np.testing.assert_array_equal(out, 2 * x)


def test_info_says_which_path_runs(capsys):
    from tinyvit.cli import main

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "CPU kernels (float32): numba" in text


def test_a_busy_pool_thread_never_holds_the_caller_up(monkeypatch):
    """Chunks go to whichever thread is free: with the pool's only thread blocked, the caller does all of
    them and returns (a fixed split would wait for the blocked thread)."""
    import threading

    monkeypatch.setenv("TINYVIT_THREADS", "2")
    release = threading.Event()
    blocker = kernels._pool(1).submit(release.wait, 30)
    try:
        x, _ = _data((4, kernels.MIN_ELEMENTS))  # several chunks
        out = kernels.gelu_forward(x, "none")
        assert not blocker.done()  # the pool thread was blocked all along
    finally:
        release.set()
        blocker.result()
    np.testing.assert_array_equal(out, kernels.gelu_forward(x, "none"))


def test_an_error_in_a_chunk_reaches_the_caller(monkeypatch):
    monkeypatch.setenv("TINYVIT_THREADS", "2")
    seen = []

    def loop(lo, hi):
        seen.append((lo, hi))
        if lo == 0:
            raise FloatingPointError("chunk 0 failed")

    with pytest.raises(FloatingPointError, match="chunk 0"):
        kernels._share(loop, (), 100, 10)
    assert sorted(seen)[0] == (0, 10)


@pytest.mark.parametrize("lead", [(8, 3), (1, 4), (5,)])
def test_stack_matmul_equals_matmul_and_restores_blas_threads(lead, monkeypatch):
    """The attention's stacks of products, shared over the pool with one BLAS thread each."""
    monkeypatch.setenv("TINYVIT_THREADS", "2")
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((*lead[:1], 197, 3, *lead[1:], 64)).astype(np.float32)  # strided views, as attention's
    q, k = np.moveaxis(qkv[:, :, 0], 1, -2), np.moveaxis(qkv[:, :, 1], 1, -2)  # (*lead, 197, 64)
    before = [lib.num_threads for lib in kernels._blas_libraries()]
    scores = kernels.stack_matmul(q, k.swapaxes(-1, -2))
    assert scores is not None and scores.shape == (*lead, 197, 197)
    assert_close("q k^T", scores, q.astype(np.float64) @ k.swapaxes(-1, -2).astype(np.float64), **F32)
    out = np.zeros((*lead[:1], 197, 2, *lead[1:], 64), np.float32)
    view = np.moveaxis(out[:, :, 1], 1, -2)  # written in place through a strided view
    assert kernels.matmul(scores, k, out=view) is view
    assert_close("scores k", view, scores.astype(np.float64) @ k.astype(np.float64), **F32)
    assert not out[:, :, 0].any()
    assert [lib.num_threads for lib in kernels._blas_libraries()] == before
    assert kernels.stack_matmul(q[0, 0] if q.ndim > 3 else q[0], k[0, 0].T if k.ndim > 3 else k[0].T) is None  # 2-D


def test_stack_matmul_leaves_small_stacks_to_numpy(monkeypatch):
    monkeypatch.setenv("TINYVIT_THREADS", "2")
    a = np.ones((64, 4, 5, 24), np.float32)  # the digits model's attention: 154k multiply-adds in all
    assert kernels.stack_matmul(a, a.swapaxes(-1, -2)) is None
    np.testing.assert_array_equal(kernels.matmul(a, a.swapaxes(-1, -2)), a @ a.swapaxes(-1, -2))


def test_stack_matmul_from_two_threads_gives_blas_its_threads_back(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("TINYVIT_THREADS", "2")
    before = [lib.num_threads for lib in kernels._blas_libraries()]
    a = np.random.default_rng(0).standard_normal((6, 2, 120, 64)).astype(np.float32)
    with ThreadPoolExecutor(2) as ex:
        outs = list(ex.map(lambda _: kernels.stack_matmul(a, a.swapaxes(-1, -2)), range(6)))
    assert all(o is not None for o in outs)
    assert [lib.num_threads for lib in kernels._blas_libraries()] == before
