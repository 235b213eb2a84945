"""Chapter 8: bring your own layer. Write a layer tinyvit lacks, prove its backward, plug it into a block.

The layer is **RMSNorm** (Zhang & Sennrich 2019; LLaMA, and many recent ViTs): LayerNorm without
the mean, ``out = x / rms(x) * w`` with ``rms(x) = sqrt(mean(x^2) + eps)`` over the last axis.
Its backward, per row (``r = rms(x)``, ``x_hat = x / r``, ``g = dout * w``)::

    dx = (g - x_hat * mean(g * x_hat)) / r          the second term: how x moves r
    dw = sum over rows of dout * x_hat

The chapter, in four steps:

1. RMSNorm's forward and backward, in tinyvit's contract: ``out, cache = f_forward(...)`` and
   ``dx, dw = f_backward(dout, cache)``, the backward reading only its cache;
2. proven with ``tinyvit.gradcheck.assert_backward``: every coordinate against central finite
   differences in float64 and against PyTorch's ``F.rms_norm`` autograd, in one report;
3. a deliberately broken copy (it forgets that ``r`` depends on ``x``) fails, and the report says
   which argument, how far off, and where the worst coordinate is;
4. RMSNorm (and LayerScale, ``out = gamma * x``, CaiT's per-channel scale) plugged into a
   pre-norm encoder block built from tinyvit's own attention and MLP layers; the whole block
   is checked in directional mode (a few forwards per parameter) and against PyTorch.

Read with ``tinyvit/gradcheck/check.py`` (the checker) and ``docs/gradcheck.md``. To give a
layer of ``tinyvit/layers/`` a row in ``tinyvit gradcheck``, add a ``Case`` to
``tinyvit/gradcheck/cases.py`` (the last lines of this chapter print one).

Run: ``python3 examples/08_bring_your_own_layer.py``. Picture: ``docs/images/08_gradcheck.png``.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import _tour
import numpy as np
import torch
import torch.nn.functional as F

from tinyvit.backend import array_module
from tinyvit.gradcheck import assert_backward, check_backward
from tinyvit.layers.attention import attention_backward, attention_forward
from tinyvit.layers.mlp import mlp_backward, mlp_forward


# ------------------------------------------------------------------ 1. the layer
class RMSNormCache(NamedTuple):
    x_hat: object  # (..., D): x / rms(x)
    rstd: object  # (..., 1): 1 / rms(x)
    w: object  # (D,)


def rmsnorm_forward(x, w, eps: float = 1e-6):
    """``x: (..., D), w: (D,) -> out: (..., D) = x / sqrt(mean(x^2) + eps) * w``; cache: x_hat, 1/rms, w."""
    xp = array_module(x)  # NumPy or CuPy: the layer never calls np. on its arrays
    rstd = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
    x_hat = x * rstd  # (..., D)
    return x_hat * w, RMSNormCache(x_hat, rstd, w)


def rmsnorm_backward(dout, cache: RMSNormCache):
    """``dout: (..., D) -> dx: (..., D), dw: (D,)``."""
    x_hat, rstd, w = cache
    dim = x_hat.shape[-1]
    g = dout * w  # (..., D): the gradient reaching x_hat
    dw = (dout * x_hat).reshape(-1, dim).sum(axis=0)  # (D,)
    dx = (g - x_hat * (g * x_hat).mean(axis=-1, keepdims=True)) * rstd  # (..., D)
    return dx, dw


def rmsnorm_backward_broken(dout, cache: RMSNormCache):
    """The classic mistake: treat rms(x) as a constant, ``dx = dout * w / rms``. dw is still right."""
    x_hat, rstd, w = cache
    return dout * w * rstd, (dout * x_hat).reshape(-1, x_hat.shape[-1]).sum(axis=0)


class LayerScaleCache(NamedTuple):
    x: object  # (..., D)
    gamma: object  # (D,)


def layerscale_forward(x, gamma):
    """CaiT's LayerScale: ``x: (..., D), gamma: (D,) -> out: (..., D) = gamma * x``."""
    return x * gamma, LayerScaleCache(x, gamma)


def layerscale_backward(dout, cache: LayerScaleCache):
    """``dout: (..., D) -> dx: (..., D) = gamma * dout, dgamma: (D,) = sum over rows of dout * x``."""
    return dout * cache.gamma, (dout * cache.x).reshape(-1, cache.x.shape[-1]).sum(axis=0)


# ------------------------------------------------------------------ 4. the block that uses them
BLOCK_KEYS = ("norm1.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "ls1.gamma",
              "norm2.weight", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma")


def rms_block_forward(x, p: dict, heads: int):
    """Pre-norm block with RMSNorm and LayerScale (as timm's ``Block(init_values=...)``, RMSNorm for LayerNorm)::

        h   = x + ls1(attn(rms1(x)))
        out = h + ls2(mlp(rms2(h)))                  x, h, out: (B, N, D)
    """
    a, c_n1 = rmsnorm_forward(x, p["norm1.weight"])
    a, c_at = attention_forward(a, p["attn.qkv.weight"], p["attn.qkv.bias"], p["attn.proj.weight"],
                                p["attn.proj.bias"], heads)
    a, c_l1 = layerscale_forward(a, p["ls1.gamma"])
    h = x + a
    f, c_n2 = rmsnorm_forward(h, p["norm2.weight"])
    f, c_ml = mlp_forward(f, p["mlp.fc1.weight"], p["mlp.fc1.bias"], p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    f, c_l2 = layerscale_forward(f, p["ls2.gamma"])
    return h + f, (c_n1, c_at, c_l1, c_n2, c_ml, c_l2)


def rms_block_backward(dout, cache):
    """``dout: (B, N, D) -> dx: (B, N, D), grads: {key: array}``: the forward read bottom-up; at each
    residual the gradient arrives twice and is added."""
    c_n1, c_at, c_l1, c_n2, c_ml, c_l2 = cache
    g = {}
    df, g["ls2.gamma"] = layerscale_backward(dout, c_l2)
    df, g["mlp.fc1.weight"], g["mlp.fc1.bias"], g["mlp.fc2.weight"], g["mlp.fc2.bias"] = mlp_backward(df, c_ml)
    df, g["norm2.weight"] = rmsnorm_backward(df, c_n2)
    dh = dout + df  # residual: skip + branch
    da, g["ls1.gamma"] = layerscale_backward(dh, c_l1)
    da, g["attn.qkv.weight"], g["attn.qkv.bias"], g["attn.proj.weight"], g["attn.proj.bias"] = \
        attention_backward(da, c_at)
    da, g["norm1.weight"] = rmsnorm_backward(da, c_n1)
    return dh + da, g


def torch_rms_block(x, p: dict, heads: int):
    """The same block in PyTorch, for autograd's gradients."""
    batch, tokens, dim = x.shape
    hs = dim // heads
    a = F.rms_norm(x, (dim,), p["norm1.weight"], 1e-6)
    qkv = F.linear(a, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(batch, tokens, 3, heads, hs)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    att = (q @ k.transpose(-2, -1) / hs ** 0.5).softmax(dim=-1)
    a = F.linear((att @ v).transpose(1, 2).reshape(batch, tokens, dim), p["attn.proj.weight"], p["attn.proj.bias"])
    h = x + p["ls1.gamma"] * a
    f = F.gelu(F.linear(F.rms_norm(h, (dim,), p["norm2.weight"], 1e-6), p["mlp.fc1.weight"], p["mlp.fc1.bias"]))
    return h + p["ls2.gamma"] * F.linear(f, p["mlp.fc2.weight"], p["mlp.fc2.bias"])


def main() -> None:
    args = _tour.parse_args(__doc__)
    rng = np.random.default_rng(0)
    batch, tokens, dim, heads, hidden = (2, 5, 8, 2, 16) if args.quick else (2, 9, 16, 4, 32)

    _tour.banner("1. RMSNorm: forward and backward")
    x = rng.standard_normal((batch, tokens, dim)) * 2.0 + 0.5  # (B, N, D), float64: the checking precision
    w = 1.0 + 0.3 * rng.standard_normal(dim)  # (D,)
    out, cache = rmsnorm_forward(x, w)
    print(f"x {x.shape} -> out {out.shape}; cache: x_hat {cache.x_hat.shape}, 1/rms {cache.rstd.shape}")
    ours = out
    theirs = F.rms_norm(torch.tensor(x), (dim,), torch.tensor(w), 1e-6).numpy()
    print(f"forward vs torch.nn.functional.rms_norm: max abs error {np.max(np.abs(ours - theirs)):.1e}")

    _tour.banner("2. proven: assert_backward, finite differences and PyTorch in one report")
    torch_rms = lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6)  # noqa: E731 - PyTorch's, same arguments
    good = assert_backward(rmsnorm_forward, rmsnorm_backward, [x, w], names=["x", "w"], torch_forward=torch_rms)
    print(good)

    _tour.banner("3. a broken copy fails, and the report says where")
    bad = check_backward(rmsnorm_forward, rmsnorm_backward_broken, [x, w], names=["x", "w"], torch_forward=torch_rms)
    print(bad)
    if bad.ok:
        sys.exit("the broken RMSNorm passed the check: the checker is blind")
    try:
        assert_backward(rmsnorm_forward, rmsnorm_backward_broken, [x, w], names=["x", "w"])
    except AssertionError as exc:
        print(f"assert_backward raised AssertionError, first line: {str(exc).splitlines()[0]!r}")
    else:
        sys.exit("assert_backward did not raise on the broken RMSNorm")
    gamma = 0.1 * rng.standard_normal(dim)
    assert_backward(layerscale_forward, layerscale_backward, [x, gamma], names=["x", "gamma"],
                    torch_forward=lambda x, g: x * g)
    print("LayerScale (out = gamma * x): assert_backward passed (finite differences and PyTorch)")

    _tour.banner("4. plugged into a pre-norm block (RMSNorm + LayerScale around tinyvit's attention and MLP)")
    shapes = {"norm1.weight": (dim,), "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
              "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,), "ls1.gamma": (dim,), "norm2.weight": (dim,),
              "mlp.fc1.weight": (hidden, dim), "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (dim, hidden),
              "mlp.fc2.bias": (dim,), "ls2.gamma": (dim,)}
    params = [0.5 * rng.standard_normal(shapes[k]) + (1.0 if k.startswith("norm") else 0.0) for k in BLOCK_KEYS]
    block_x = rng.standard_normal((batch, tokens, dim))
    out, _ = rms_block_forward(block_x, dict(zip(BLOCK_KEYS, params)), heads)
    print(f"block: x {block_x.shape} -> out {out.shape}, {sum(p.size for p in params)} parameters")

    def forward(x, *values):
        return rms_block_forward(x, dict(zip(BLOCK_KEYS, values)), heads)

    def backward(dout, cache):
        dx, grads = rms_block_backward(dout, cache)
        return (dx, *(grads[k] for k in BLOCK_KEYS))

    def torch_forward(x, *values):
        return torch_rms_block(x, dict(zip(BLOCK_KEYS, values)), heads)

    block = assert_backward(forward, backward, [block_x] + params, names=["x"] + list(BLOCK_KEYS),
                            torch_forward=torch_forward, mode="directional", directions=3)
    print(block)

    print("""
To give a layer of tinyvit/layers/ its row in `tinyvit gradcheck`, add a Case to tinyvit/gradcheck/cases.py:

    def _rmsnorm(backend, dtype):
        r = _rand(backend, dtype, seed)
        return dict(forward=rmsnorm_forward, backward=rmsnorm_backward, args=[r(B, N, D), r(D, shift=1.0)],
                    names=["x", "w"], torch_forward=lambda x, w: F.rms_norm(x, (D,), w, 1e-6))

    CASES.append(Case("rmsnorm", _rmsnorm, covers=("rmsnorm.rmsnorm_backward",)))

tests/test_gradcheck.py fails, naming the function, while a *_backward in tinyvit/layers/ has no case.""")

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 2.4]})
    for ax, reports, title in ((axes[0], (("RMSNorm", good), ("broken copy", bad)), "RMSNorm: every coordinate"),
                               (axes[1], (("block", block),), "the block: 3 random directions per parameter")):
        labels, heights, colours = [], [], []
        for tag, report in reports:
            for r in report.rows:
                if r.name == "out":
                    continue
                labels.append(f"{tag}: {r.name}\nvs {'torch' if r.reference == 'pytorch' else 'fd'}"
                              if len(reports) > 1 else f"{r.name} ({'torch' if r.reference == 'pytorch' else 'fd'})")
                heights.append(max(r.max_rel, 1e-17))
                colours.append("tab:green" if r.passed else "tab:red")
        ax.bar(range(len(heights)), heights, color=colours)
        ax.set_xticks(range(len(heights)), labels, rotation=90, fontsize=6)
        ax.set_yscale("log")
        ax.axhline(1e-6, color="grey", lw=0.8, ls="--", label="rtol vs finite differences (1e-6)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("max |got - expected| / max |expected|")
    axes[0].legend(fontsize=7)
    fig.suptitle("tinyvit.gradcheck on a layer tinyvit lacks (green: passed, red: failed), float64", fontsize=10)
    _tour.save(fig, args, "08_gradcheck.png")


if __name__ == "__main__":
    main()
