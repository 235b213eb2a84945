"""The fused kernels of tinyvit.layers.kernels equal the plain reference layers they replace.

Every CPU test runs twice: on the numba loops (the default where numba is installed) and on the
NumPy-block GELU (``TINYVIT_NUMBA=0``, what a machine without numba runs).

Tolerances: float32 against the float64 reference, |fast - ref| / (1 + |ref|) <= 2e-6 forward and
1e-5 backward: the bounds the plain float32 formula itself meets (its tanh backward is off by
4e-6); A&S 7.1.26 erf is within 1.5e-7 absolute.
"""
import numpy as np
import pytest

from tinyvit.layers import gelu, kernels
from tinyvit.backend import cupy_available

TOL = {"forward": 2e-6, "backward": 1e-5}


@pytest.fixture(autouse=True, params=["numba", "numpy"])
def cpu_path(request, monkeypatch):
    monkeypatch.setenv("TINYVIT_NUMBA", "1" if request.param == "numba" else "0")
    if kernels.path() != request.param:
        pytest.skip(f"the {request.param} path cannot run here: {kernels.describe()}")
    return request.param


def _close(fast, ref, what):
    tol = TOL["backward" if "backward" in what else "forward"]
    err = np.max(np.abs(np.asarray(fast, np.float64) - ref) / (1.0 + np.abs(ref)))
    assert err <= tol, f"{what}: max error {err:.2e} > {tol:.0e}"


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3.0).astype(np.float32)
    x.reshape(-1)[:6] = [0.0, -0.0, 9.0, -9.0, 40.0, -40.0]  # zero, the saturated tails
    return x, rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(7,), (2, 5, 33), (3, kernels.BLOCK + 17)])
def test_gelu_fast_equals_reference(approximate, shape):
    x, dout = _inputs(shape)
    ref, cache64 = gelu.gelu_forward(x.astype(np.float64), approximate)  # float64: no fast path
    dref = gelu.gelu_backward(dout.astype(np.float64), cache64)
    fast = kernels.gelu_forward(x, approximate)
    dfast = kernels.gelu_backward(dout, x, approximate)
    assert fast.dtype == np.float32 and dfast.dtype == np.float32 and fast.shape == x.shape
    _close(fast, ref, f"gelu {approximate} forward")
    _close(dfast, dref, f"gelu {approximate} backward")
    # the layer itself takes the fast path for float32 and gives the same
    out, cache = gelu.gelu_forward(x, approximate)
    np.testing.assert_array_equal(out, fast)
    np.testing.assert_array_equal(gelu.gelu_backward(dout, cache), dfast)


def test_gelu_fast_on_strided_input_and_inputs_untouched():
    x, dout = _inputs((6, 40))
    xs, ds = x[::2, ::-3], dout[1::2, ::3]
    keep_x, keep_d = xs.copy(), ds.copy()
    fast = kernels.gelu_forward(xs, "none")
    dfast = kernels.gelu_backward(ds, xs, "none")
    np.testing.assert_array_equal(xs, keep_x)
    np.testing.assert_array_equal(ds, keep_d)
    _close(fast, gelu.gelu_reference_forward(keep_x.astype(np.float64)), "strided forward")
    _close(dfast, gelu.gelu_reference_backward(keep_d.astype(np.float64),
                                               gelu.GeluCache(keep_x.astype(np.float64), "none")), "strided backward")


def test_no_fast_path_for_float64_or_when_switched_off(monkeypatch):
    x, dout = _inputs((4, 5))
    assert kernels.gelu_forward(x.astype(np.float64), "none") is None
    assert kernels.gelu_backward(dout, x.astype(np.float64), "none") is None
    monkeypatch.setenv("TINYVIT_FUSED", "0")
    assert kernels.gelu_forward(x, "none") is None
    out, _ = gelu.gelu_forward(x, "none")  # the reference then
    np.testing.assert_array_equal(out, gelu.gelu_reference_forward(x, "none"))


_HAS_CUPY, _WHY = cupy_available()


@pytest.mark.skipif(not _HAS_CUPY, reason=f"no GPU/CuPy here: {_WHY}")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_cupy_kernel_equals_reference(approximate):
    from tinyvit.backend import get_backend

    be = get_backend("cupy")
    x, dout = _inputs((3, 50, 70))
    ref = gelu.gelu_reference_forward(x.astype(np.float64), approximate)
    dref = gelu.gelu_reference_backward(dout.astype(np.float64), gelu.GeluCache(x.astype(np.float64), approximate))
    fast = kernels.gelu_forward(be.asarray(x), approximate)
    dfast = kernels.gelu_backward(be.asarray(dout), be.asarray(x), approximate)
    _close(be.to_host(fast), ref, "cupy forward")
    _close(be.to_host(dfast), dref, "cupy backward")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_threads_give_the_same_bits(approximate, monkeypatch):
    x, dout = _inputs((5, kernels.BLOCK // 2 + 3))  # several blocks, the last one short
    monkeypatch.setenv("TINYVIT_THREADS", "1")
    one = kernels.gelu_forward(x, approximate), kernels.gelu_backward(dout, x, approximate)
    monkeypatch.setenv("TINYVIT_THREADS", "3")
    three = kernels.gelu_forward(x, approximate), kernels.gelu_backward(dout, x, approximate)
    np.testing.assert_array_equal(one[0], three[0])
    np.testing.assert_array_equal(one[1], three[1])
