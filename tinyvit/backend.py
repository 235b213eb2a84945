"""Everything that differs between NumPy (CPU) and CuPy (GPU) lives here.

The layers never import CuPy and never choose a backend themselves: each op asks
``array_module(x)`` for the module of the array it was given (as CuPy's guide
recommends), and the few things that are not plain array-module calls (exact
``erf``, the random generator, moving data to and from the host, synchronising)
are functions and methods of this module.

A :class:`Backend` is a small value object a model holds; there is no global
"current backend". ``get_backend(None)`` reads ``TINYVIT_BACKEND`` (default
``numpy``) so the command line and the tests can pick one without code changes.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

BACKENDS = ("numpy", "cupy")
DTYPES = ("float32", "float64")


def array_module(x):
    """The array module (``numpy``, ``cupy``, ...) that owns array ``x``.

    CuPy is only consulted if it has already been imported (by :func:`get_backend`);
    any other array type that speaks the array API (``__array_namespace__``) gets
    its own namespace back, which is how the tests' strict device-like arrays plug in.
    """
    if isinstance(x, np.ndarray):
        return np
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return cupy
    namespace = getattr(x, "__array_namespace__", None)
    if namespace is not None:
        return namespace()
    return np


def erf(x):
    """Exact error function, elementwise, in the dtype of ``x`` (scipy / cupyx)."""
    xp = array_module(x)
    if xp is np:
        import scipy.special

        return scipy.special.erf(x)
    if xp.__name__ == "cupy":
        import cupyx.scipy.special

        return cupyx.scipy.special.erf(x)
    return xp.erf(x)  # another namespace (the tests' strict arrays) brings its own


def to_host(x) -> np.ndarray:
    """Any backend array -> a NumPy array: the one explicit device-to-host copy.

    Used only at the edges (label checks, state dicts, printing), never inside a step.
    """
    xp = array_module(x)
    if xp is np:
        return np.asarray(x)
    if xp.__name__ == "cupy":
        return x.get()
    return xp.to_host(x)  # another namespace (the tests' strict arrays)


def is_backend_array(x) -> bool:
    """True for NumPy and CuPy arrays (and namespaced array types), False for lists, scalars."""
    if isinstance(x, np.ndarray):
        return True
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return True
    return hasattr(x, "__array_namespace__") and hasattr(x, "shape") and hasattr(x, "dtype")


@dataclass(frozen=True)
class Backend:
    """One array backend: ``name`` is ``"numpy"`` or ``"cupy"``; ``xp`` is its module."""

    name: str
    xp: Any

    def asarray(self, host_array, dtype=None):
        """Host NumPy array -> this backend's array (an explicit host-to-device copy on CuPy)."""
        return self.xp.asarray(host_array, dtype=dtype)

    def to_host(self, x) -> np.ndarray:
        """This backend's array -> a NumPy array (an explicit device-to-host copy on CuPy)."""
        return to_host(x)

    def owns(self, x) -> bool:
        """True if ``x`` is an array of this backend (not the other one, not a list)."""
        return is_backend_array(x) and array_module(x) is self.xp

    def rng(self, seed):
        """A random generator on this backend (``numpy.random.Generator`` or CuPy's)."""
        return self.xp.random.default_rng(seed)

    def synchronize(self) -> None:
        """Wait for queued GPU work (a no-op on the CPU); needed before reading a timer."""
        if self.name == "cupy":
            self.xp.cuda.get_current_device().synchronize()


def get_backend(name: str | Backend | None = None) -> Backend:
    """The backend called ``name``; ``None`` reads ``TINYVIT_BACKEND`` (default ``numpy``).

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` saying whether CuPy
    is missing or no GPU is visible when ``"cupy"`` cannot be used.
    """
    if isinstance(name, Backend):
        return name
    if name is None:
        name = os.environ.get("TINYVIT_BACKEND", "numpy") or "numpy"
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "numpy":
        return Backend("numpy", np)
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(
            "backend='cupy' needs CuPy, which is not installed: "
            "pip install 'tinyvit[cuda12]' (cupy-cuda12x) or 'tinyvit[cuda13]' (cupy-cuda13x)"
        ) from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken
        raise RuntimeError(f"backend='cupy': CuPy is installed but no GPU is usable ({exc})") from exc
    if count == 0:
        raise RuntimeError("backend='cupy': CuPy is installed but no GPU is visible")
    return Backend("cupy", cupy)


def cupy_available() -> tuple[bool, str]:
    """(True, "") if the CuPy backend can run here, else (False, the reason)."""
    try:
        get_backend("cupy")
    except RuntimeError as exc:
        return False, str(exc)
    return True, ""


def check_dtype_name(dtype) -> str:
    """Normalise a dtype argument to ``"float32"`` / ``"float64"`` or raise ``ValueError``."""
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return name
