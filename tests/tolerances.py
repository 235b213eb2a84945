"""One table of tolerances per dtype, and the comparison that reports failures well.

float64: the two sides (tinyvit vs PyTorch, or vs finite differences) agree to rounding;
the limits leave ~100x headroom over what is observed. float32: ~1e-7 relative rounding
per op, accumulated over sums of a few hundred terms.
"""
import numpy as np

TOLERANCES = {
    # comparisons with PyTorch autograd / a PyTorch twin
    "float64": {"rtol": 1e-9, "atol": 1e-10},
    "float32": {"rtol": 1e-4, "atol": 1e-5},
}
# central finite differences in float64 with step FD_STEP: truncation O(h^2) ~ 1e-12,
# cancellation ~ 1e-16 / h ~ 1e-10 on O(1) values.
FD_STEP = 1e-6
FD_TOLERANCE = {"rtol": 1e-6, "atol": 1e-8}


def assert_close(name, actual, expected, rtol, atol):
    """Like numpy's assert_allclose, but says the tensor's name, its max abs/rel error,
    the tolerance and a few of the worst pairs.

    ``atol`` is scaled by the tensor's largest magnitude (at least 1): an element of a
    gradient that is a sum of large terms cancelling to near zero carries the rounding
    of those terms, not of its own size.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {actual.shape} != expected {expected.shape}")
    err = np.abs(actual - expected)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    bad = err > atol * scale + rtol * np.abs(expected)
    if bad.any() or not np.all(np.isfinite(actual) == np.isfinite(expected)):
        rel = err / np.maximum(np.abs(expected), 1e-300)
        worst = np.argsort(err.ravel())[::-1][:4]
        pairs = ", ".join(f"{actual.ravel()[i]:.6g} vs {expected.ravel()[i]:.6g}" for i in worst)
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.size} elements off; max abs err {err.max():.3g}, "
                             f"max rel err {rel.max():.3g}; tolerance rtol={rtol} atol={atol}; worst pairs: {pairs}")
