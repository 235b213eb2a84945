"""Lower-precision matrix products: the rule of PyTorch's autocast, written out.

Derivation: docs/mixed_precision.md (the learners' tour: examples/11_lower_precision.py)

Mixed precision changes only the matrix products. Every other op (LayerNorm and its
statistics, softmax, GELU, dropout, the residual adds, the loss, the bias-gradient sums)
keeps float32, as autocast keeps ``layer_norm``, ``softmax``, ``log_softmax``, ``sum`` and
``cross_entropy`` in float32. A product in precision ``p``::

    lowp_matmul(a, b, p) = round_p( round_p(a) @ round_p(b) )      accumulated in float32

``round_p`` rounds to the nearest fp16 / bf16 value (ties to even; fp16 overflows to
+-inf above 65504, and flushes below its smallest subnormal 2^-24 to 0: the underflow a
loss scale exists for). A product of two fp16 (11-bit) or bf16 (8-bit) significands is
exact in float32's 24 bits, so ``round(a) @ round(b)`` in float32 is what a GPU's tensor
cores compute (fp16/bf16 inputs, float32 accumulation, the result rounded to fp16/bf16),
up to the order of the additions.

Where each backend does it:

- NumPy: NumPy's own float16 matmul has no BLAS path (a plain loop: ~7x slower than float32 on
  a 256-square product here) and bfloat16 is not a NumPy dtype at all (``ml_dtypes`` adds
  it). So on NumPy the operands are rounded (bf16 through ``ml_dtypes``), multiplied by
  float32 BLAS and the result rounded: the same numbers, for correctness and learning.
- CuPy: fp16 is the fast path: the operands are cast to ``cupy.float16`` and cuBLAS
  multiplies them (tensor cores, float32 accumulation). CuPy has no bfloat16 dtype; bf16
  rounds float32 bit patterns (:func:`round_bf16_bits`) and multiplies in float32.

Values stay in float32 arrays between the products (they hold fp16/bf16-representable
numbers where a product left them), so every other op sees float32.
"""
from __future__ import annotations

from . import kernels
from ..backend import array_module

PRECISIONS = ("fp32", "fp16", "bf16")


def check_precision(precision) -> str:
    """``"fp32" | "fp16" | "bf16"`` or a ``ValueError`` naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def _ml_dtypes():
    try:
        import ml_dtypes
    except ImportError as exc:
        raise RuntimeError("precision='bf16' on NumPy needs ml_dtypes, which NumPy uses for its bfloat16 dtype: "
                           "pip install ml_dtypes (or pip install 'tinyvit[lowp]')") from exc
    return ml_dtypes


def check_precision_supported(xp, precision: str, dtype: str = "float32") -> None:
    """Raise a clear error if ``precision`` cannot run on array module ``xp`` with master weights of ``dtype``.

    fp16/bf16 keep float32 master weights: a float64 model is an error. bf16 on NumPy needs
    ``ml_dtypes``; fp16 on CuPy needs a GPU with fp16 arithmetic (compute capability >= 5.3).
    """
    check_precision(precision)
    if precision == "fp32":
        return
    if dtype != "float32":
        raise ValueError(f"precision={precision!r} keeps float32 master weights and rounds the matrix products; "
                         f"the model is {dtype}: build it with dtype='float32'")
    if precision == "bf16" and xp.__name__ == "numpy":
        _ml_dtypes()
    if precision == "fp16" and xp.__name__ == "cupy":
        major, minor = (int(c) for c in xp.cuda.Device().compute_capability[:2])
        if (major, minor) < (5, 3):
            raise RuntimeError(f"precision='fp16' needs a GPU with fp16 arithmetic (compute capability >= 5.3); "
                               f"this one is {major}.{minor}: use precision='fp32'")


def round_bf16_bits(x):
    """``x: float32 (...) -> float32 (...)`` rounded to the nearest bfloat16, ties to even, by bit arithmetic.

    bfloat16 is float32's top 16 bits, so rounding adds ``0x7FFF`` plus the lowest kept bit
    and clears the low 16 bits (a carry into the exponent rounds up correctly, up to inf).
    NaN is passed through untouched (the carry could turn a NaN's payload into an inf).
    Works on any array module (CuPy has no bfloat16 dtype); equals ``ml_dtypes``' rounding.
    """
    xp = array_module(x)
    bits = x.view(xp.uint32)
    bias = (xp.right_shift(bits, 16) & 1) + 0x7FFF
    rounded = ((bits + bias) & 0xFFFF0000).view(xp.float32)
    return xp.where(xp.isnan(x), x, rounded)


def round_to(x, precision: str):
    """``x: float32 (...) -> float32 (...)`` holding the nearest fp16 / bf16 values (fp32: ``x`` itself)."""
    if precision == "fp32":
        return x
    xp = array_module(x)
    if precision == "fp16":
        if xp.__name__ == "numpy":
            import numpy

            with numpy.errstate(over="ignore"):  # above 65504 -> inf is fp16's answer (the loss scale watches for it)
                return x.astype(xp.float16).astype(xp.float32)
        return x.astype(xp.float16).astype(xp.float32)
    if xp.__name__ == "numpy":
        return x.astype(_ml_dtypes().bfloat16).astype(xp.float32)
    return round_bf16_bits(x)


def lowp_matmul(a, b, precision: str = "fp32"):
    """``a: (..., M, K) @ b: (..., K, N) -> (..., M, N)`` float32, computed in ``precision``.

    fp32: ``a @ b`` itself. fp16 / bf16: operands and result rounded, products accumulated
    in float32 (see the module docstring); on CuPy, fp16 runs as a real float16 product.
    """
    if precision == "fp32":
        return kernels.matmul(a, b)  # a @ b; a NumPy stack of products shared over the kernels' threads
    xp = array_module(a)
    if precision == "fp16" and xp.__name__ == "cupy":
        return (a.astype(xp.float16) @ b.astype(xp.float16)).astype(xp.float32)
    return round_to(round_to(a, precision) @ round_to(b, precision), precision)
