"""Chapter 14: CPU kernels. The same GELU, LayerNorm and softmax, in one pass over memory instead of five.

The layers' readable formulas (``gelu.py``, ``layernorm.py``, ``attention.py``) make one pass over
the array per NumPy call, each with a temporary; at ViT sizes the arrays leave the cache and the
time is memory traffic. ``tinyvit/layers/kernels_numba.py`` writes each layer as one loop per
element or row, compiled by numba, with ``exp``/``erf`` as multiply-adds so the loop vectorises;
``tinyvit/layers/kernels.py`` picks which version runs (``kernels.path()``), in one place.

The chapter, in three steps:

1. which version runs here, and why (``tinyvit info`` prints the same line);
2. how equal: each compiled loop and the NumPy-block GELU against the float64 reference, and the
   float32 reference itself for scale (the fast versions are as close as the formula in float32);
3. how fast: the reference, the NumPy blocks and the compiled loop against PyTorch's CPU kernels on
   the same arrays, timed interleaved (medians; the machine may be shared, so read the ratios).

Read with ``docs/kernels.md`` (the exp/erf polynomials, why a thread pool and not ``prange``).
Run: ``python3 examples/14_cpu_kernels.py``. Picture: ``docs/images/14_cpu_kernels.png``.
"""
from __future__ import annotations

import os
import statistics
import time

import _tour
import numpy as np
import torch
import torch.nn.functional as F

from tinyvit.layers import attention, gelu, kernels, layernorm


def with_env(env, fn):
    """Call ``fn()`` with environment switches (``TINYVIT_NUMBA=0``, ``TINYVIT_FUSED=0``) set, then restore."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


VERSIONS = {"reference": {"TINYVIT_FUSED": "0"}, "NumPy blocks": {"TINYVIT_NUMBA": "0"}, "compiled loop": {}}


def layers(x, w, b, s):
    """Each layer's forward and backward as closures over fixed inputs: name -> (forward, backward)."""
    rng = np.random.default_rng(1)
    dout = rng.standard_normal(x.shape).astype(x.dtype)  # (B, N, F)
    ds = rng.standard_normal(s.shape).astype(s.dtype)  # (B, NH, N, N)
    return {
        "GELU": (lambda: gelu.gelu_forward(x, "none")[0],
                 lambda: gelu.gelu_backward(dout, gelu.GeluCache(x, "none"))),
        "LayerNorm": (lambda: layernorm.layernorm_forward(x, w, b, 1e-6)[0],
                      lambda: layernorm.layernorm_backward(dout, layernorm.layernorm_forward(x, w, b, 1e-6)[1])[0]),
        "softmax": (lambda: attention.softmax_forward(s)[0],
                    lambda: attention.softmax_backward(ds, attention.softmax_forward(s)[1])),
    }


def step1_which():
    _tour.banner("1. which version runs here")
    print(f"kernels.path() = {kernels.path()!r}: {kernels.describe()}")
    t = kernels.compile_all()
    print(f"compiled (or loaded from numba's cache) every loop in {t:.2f} s: the first call's cost, once per process")


def step2_equal(x, w, b, s):
    _tour.banner("2. how equal (max |fast - float64 reference|)")
    ref64 = {name: (f(), g()) for name, (f, g) in
             layers(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), s.astype(np.float64)).items()}
    errors = {}
    for version, env in VERSIONS.items():
        for name, (f, g) in layers(x, w, b, s).items():
            out, grad = with_env(env, f), with_env(env, g)
            assert out.dtype == np.float32 and out.shape == ref64[name][0].shape
            errors[(version, name)] = (_tour.max_err(out, ref64[name][0])[0], _tour.max_err(grad, ref64[name][1])[0])
            print(f"{name:10s} {version:14s} forward {errors[(version, name)][0]:.1e}  backward "
                  f"{errors[(version, name)][1]:.1e}   shape {tuple(x.shape if name != 'softmax' else s.shape)}")
    for (version, name), (e_out, e_grad) in errors.items():  # within the suite's float32 tolerances
        assert e_out < 1e-4 and e_grad < 1e-4, (version, name, e_out, e_grad)
    return errors


def step3_fast(x, w, b, s, repeats):
    _tour.banner("3. how fast (median ms, interleaved; PyTorch's CPU kernels on the same arrays)")
    xt, wt, bt, st = (torch.from_numpy(a) for a in (x, w, b, s))
    torch_fns = {"GELU": lambda: F.gelu(xt), "LayerNorm": lambda: F.layer_norm(xt, (x.shape[-1],), wt, bt, 1e-6),
                 "softmax": lambda: st.softmax(-1)}
    fns = {}
    for name, (f, _) in layers(x, w, b, s).items():
        for version, env in VERSIONS.items():
            if version == "NumPy blocks" and name != "GELU":
                continue  # LayerNorm and softmax without numba run the reference
            fns[(name, version)] = (lambda env=env, f=f: with_env(env, f))
        fns[(name, "PyTorch")] = torch_fns[name]
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for (name, version), ms in medians.items():
        print(f"{name:10s} {version:14s} {ms:8.3f} ms   x PyTorch {ms / medians[(name, 'PyTorch')]:.2f}")
    return medians


def main():
    args = _tour.parse_args(__doc__)
    rng = np.random.default_rng(0)
    batch, tokens, dim, hidden, heads = (2, 65, 192, 768, 3) if args.quick else (8, 197, 192, 768, 3)
    x = (rng.standard_normal((batch, tokens, hidden)) * 2).astype(np.float32)  # (B, N, F): the MLP's hidden
    w = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    b = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
    s = (rng.standard_normal((batch, heads, tokens, tokens)) * 3).astype(np.float32)  # (B, NH, N, N) scores
    torch.set_num_threads(kernels.threads())
    step1_which()
    errors = step2_equal(x, w, b, s)
    medians = step3_fast(x, w, b, s, repeats=3 if args.quick else 15)

    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
    grid = np.linspace(-8, 8, 4001).astype(np.float32)
    ref = gelu.gelu_forward(grid.astype(np.float64), "none")[0]
    for version, env in VERSIONS.items():
        out = with_env(env, lambda: gelu.gelu_forward(grid, "none")[0])
        ax1.semilogy(grid, np.abs(out - ref) + 1e-12, lw=0.8, label=version)
    ax1.axhline(np.finfo(np.float32).eps, color="k", ls="--", lw=0.8, label="float32 eps")
    ax1.set_xlabel("x")
    ax1.set_ylabel("|GELU(x) - float64 reference|")
    ax1.set_title("exact GELU in float32: every version is at rounding level", fontsize=9)
    ax1.legend(fontsize=7)
    names = ["GELU", "LayerNorm", "softmax"]
    versions = ["reference", "NumPy blocks", "compiled loop", "PyTorch"]
    for j, version in enumerate(versions):
        vals = [medians.get((n, version), np.nan) for n in names]
        ax2.bar(np.arange(3) + 0.2 * j - 0.3, vals, 0.2, label=version)
    ax2.set_xticks(range(3), [f"{n} forward" for n in names])
    ax2.set_ylabel("median ms")
    ax2.set_yscale("log")
    ax2.set_title(f"shape ({batch}, {tokens}, {hidden}) and scores ({batch}, {heads}, {tokens}, {tokens}), "
                  f"{kernels.threads()} threads", fontsize=9)
    ax2.legend(fontsize=7)
    _tour.save(fig, args, "14_cpu_kernels.png")
    del errors


if __name__ == "__main__":
    main()
