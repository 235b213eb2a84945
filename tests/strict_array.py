"""A CPU stand-in for a GPU array that refuses every implicit trip to the host.

CuPy refuses ``numpy.asarray(cupy_array)``; this ``StrictArray`` goes further and also
refuses ``float()``, ``int()``, ``bool()``, iteration and every NumPy function or ufunc
called on it; and it refuses arithmetic that silently widens its float dtype (a float32
array times a NumPy float64 scalar is float64 in NumPy 2). The engine must reach all its arithmetic through the
array module it gets from ``tinyvit.backend.array_module(x)`` (here: :data:`strict_xp`),
so a stray ``np.`` call or ``float()`` on a backend array fails a test on a machine
without a GPU instead of on a user's GPU.

The only way out is explicit: ``strict_xp.to_host(a)`` (like CuPy's ``.get()``).
"""
from __future__ import annotations

import types

import numpy as np
from einops._backends import AbstractBackend


class HostTransferError(TypeError):
    pass


def _unwrap(obj):
    if isinstance(obj, StrictArray):
        return obj._a
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


def _wrap(obj):
    if isinstance(obj, np.ndarray):
        return StrictArray(obj)
    if isinstance(obj, np.generic):  # numpy returns scalars from full reductions: keep them on "device"
        return StrictArray(np.asarray(obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_wrap(o) for o in obj)
    return obj


def _refuse(what):
    def method(self, *args, **kwargs):
        raise HostTransferError(f"implicit device-to-host transfer ({what}) of a StrictArray; "
                                f"use an explicit to_host()")
    return method


class StrictArray:
    """Wraps an ndarray; arithmetic stays strict, host conversion raises."""

    __array_ufunc__ = None  # numpy ufuncs (np.exp(a), np.float64(2) * a ...) refuse it
    __slots__ = ("_a",)

    def __init__(self, array: np.ndarray):
        self._a = array

    # the array protocol: refused, as CuPy refuses __array__
    __array__ = _refuse("__array__")
    __float__ = _refuse("float()")
    __int__ = _refuse("int()")
    __index__ = _refuse("operator.index()")
    __bool__ = _refuse("bool()")
    __complex__ = _refuse("complex()")
    __iter__ = _refuse("iteration")
    tolist = _refuse("tolist()")
    item = _refuse("item()")

    def __array_function__(self, func, types, args, kwargs):
        raise HostTransferError(f"numpy.{func.__name__} called on a StrictArray; use the array module "
                                f"from tinyvit.backend.array_module(x)")

    def __array_namespace__(self, api_version=None):
        return strict_xp

    # attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: StrictArray(self._a.T))

    def __len__(self):
        return len(self._a)

    def __repr__(self):
        return f"StrictArray(shape={self.shape}, dtype={self.dtype})"

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key)])

    def __setitem__(self, key, value):
        self._a[_unwrap(key)] = _unwrap(value)

    def __getattr__(self, name):  # reshape, transpose, sum, mean, max, astype, swapaxes, copy ...
        if name.startswith("__"):  # __array_interface__, __array_struct__, __dlpack__ ...: no way out
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)

        def method(*args, **kwargs):
            return _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))
        return method


def _binary(name):
    def op(self, other):
        if isinstance(other, np.ndarray):
            raise HostTransferError(f"mixing a StrictArray with a numpy.ndarray in '{name}'")
        result = getattr(self._a, name)(_unwrap(other))
        if result is NotImplemented:
            return NotImplemented
        mine = self._a.dtype
        if mine.kind == "f" and result.dtype.kind == "f" and result.dtype.itemsize > mine.itemsize:
            raise TypeError(f"silent upcast: {mine} {name} {type(other).__name__} gave {result.dtype} "
                            f"(NumPy 2 promotes float32 with numpy float64 scalars; use Python floats)")
        return _wrap(result)
    return op


for _name in ("add", "sub", "mul", "truediv", "floordiv", "pow", "matmul", "mod", "and", "or", "xor",
              "lt", "le", "gt", "ge", "eq", "ne"):
    for _fmt in ("__{}__", "__r{}__", "__i{}__"):
        _dunder = _fmt.format(_name)
        if hasattr(np.ndarray, _dunder):
            setattr(StrictArray, _dunder, _binary(_dunder))
for _dunder in ("__neg__", "__pos__", "__abs__", "__invert__"):
    setattr(StrictArray, _dunder, (lambda d: lambda self: _wrap(getattr(self._a, d)()))(_dunder))


def _namespace_function(name):
    func = getattr(np, name)

    def wrapped(*args, **kwargs):
        if name not in _HOST_INPUT_OK and _holds_host_array((args, kwargs)):
            raise HostTransferError(f"strict_xp.{name} got a host numpy.ndarray; move it with asarray first")
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))
    wrapped.__name__ = name
    return wrapped


_HOST_INPUT_OK = {"asarray", "array"}


def _holds_host_array(obj) -> bool:
    if isinstance(obj, np.ndarray):
        return obj.ndim > 0
    if isinstance(obj, (list, tuple)):
        return any(_holds_host_array(o) for o in obj)
    if isinstance(obj, dict):
        return any(_holds_host_array(o) for o in obj.values())
    return False  # the explicit host -> device copies


class _StrictRandom:
    @staticmethod
    def default_rng(seed=None):
        return _StrictGenerator(np.random.default_rng(seed))


class _StrictGenerator:
    def __init__(self, gen):
        self._gen = gen
        self.bit_generator = gen.bit_generator

    def __getattr__(self, name):
        attr = getattr(self._gen, name)

        def method(*args, **kwargs):
            return _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))
        return method


class _StrictNamespace(types.ModuleType):
    """``numpy``'s functions, taking and returning StrictArrays."""

    def __getattr__(self, name):
        value = getattr(np, name)
        if isinstance(value, (type, np.dtype)) or not callable(value):
            return value  # dtypes (float32 ...), constants (pi, newaxis)
        return _namespace_function(name)


strict_xp = _StrictNamespace("strict_xp")
strict_xp.random = _StrictRandom()
strict_xp.to_host = lambda a: np.array(a._a)  # the one explicit way out


def _erf(a):
    import scipy.special
    return StrictArray(scipy.special.erf(a._a))


strict_xp.erf = _erf


class StrictEinopsBackend(AbstractBackend):
    """Lets einops.rearrange see StrictArrays (einops finds backends by subclass)."""

    framework_name = __name__  # this module, imported by whoever uses StrictArray

    def is_appropriate_type(self, tensor):
        return isinstance(tensor, StrictArray)

    def shape(self, x):
        return x.shape

    def reshape(self, x, shape):
        return x.reshape(shape)

    def transpose(self, x, axes):
        return x.transpose(axes)

    def is_float_type(self, x):
        return x.dtype in ("float16", "float32", "float64")

    def add_axis(self, x, new_position):
        return strict_xp.expand_dims(x, new_position)
