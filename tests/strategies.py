"""Hypothesis strategies named by the shape letters (B, N, D, NH, ...), bounded, no NaN."""
import numpy as np
from hypothesis import strategies as st

batch = st.integers(1, 3)  # B
tokens = st.integers(1, 7)  # N
heads = st.integers(1, 4)  # NH
head_size = st.integers(1, 6)  # hs; D = NH * hs
hidden = st.integers(1, 12)  # F
patch = st.integers(1, 3)  # P
grid = st.integers(1, 3)  # H/P or W/P
channels = st.sampled_from([1, 3])  # C
dtypes = st.sampled_from(["float64", "float32"])
eps = st.sampled_from([1e-6, 1e-5, 1e-3, 0.5])
seeds = st.integers(0, 2**32 - 1)
rates = st.sampled_from([0.0, 0.1, 0.5])


def normal(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def maybe_noncontiguous(rng, array, flag):
    """The same values, laid out non-contiguously (a transposed copy transposed back, or a strided view)."""
    if not flag or array.ndim == 0:
        return array
    wide = np.empty(array.shape[:-1] + (array.shape[-1] * 2,), dtype=array.dtype)
    wide[..., ::2] = array
    view = wide[..., ::2]
    assert not view.flags.c_contiguous or array.shape[-1] <= 1
    return view


def block_param_shapes(D, F):
    """``{key: shape}`` of one encoder block's parameters (keys without ``blocks.{i}.``)."""
    return {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
            "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "norm2.weight": (D,), "norm2.bias": (D,),
            "mlp.fc1.weight": (F, D), "mlp.fc1.bias": (F,), "mlp.fc2.weight": (D, F), "mlp.fc2.bias": (D,)}
