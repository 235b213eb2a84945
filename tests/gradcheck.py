"""Central finite differences for the layer tests (float64 only)."""
import numpy as np

from tests.tolerances import FD_STEP


def numeric_grad(f, x, dout, step=FD_STEP):
    """d/dx of sum(f() * dout) by central differences, perturbing ``x`` in place and restoring it.

    ``f`` is a closure over ``x`` (and the other inputs); ``dout`` is a *random* upstream
    gradient (an all-ones dout hides bugs such as a missing softmax Jacobian term).
    """
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    assert flat.base is x or flat is x or np.shares_memory(flat, x)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + step
        plus = np.sum(f() * dout)
        flat[i] = orig - step
        minus = np.sum(f() * dout)
        flat[i] = orig
        gflat[i] = (plus - minus) / (2 * step)
    return grad
