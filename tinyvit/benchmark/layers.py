"""Per-layer benchmarks, forward and backward, at the shapes of real ViTs.

Each layer is a *case*: inputs built on the host, the tinyvit forward/backward, the same
layer in eager PyTorch, and for NumPy the *variants* that were tried (dev/cuda style:
the engine's version plus the losers, kept so the numbers can be re-measured). Every
variant's output is compared with PyTorch's before anything is timed.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager

import numpy as np

from . import flops
from ..layers.attention import attention_backward, attention_forward, softmax_backward, softmax_forward
from ..backend import get_backend
from ..layers.flash_attention import DEFAULT_BLOCK, flash_attention_backward, flash_attention_forward
from ..layers.block import BLOCK_KEYS, block_backward, block_forward
from ..layers.gelu import GeluCache, gelu_backward, gelu_forward, gelu_reference_backward, gelu_reference_forward
from ..layers.layernorm import layernorm_backward, layernorm_forward
from ..layers.linear import linear_backward, linear_forward
from ..layers.mlp import mlp_backward, mlp_forward
from ..layers.patch_embed import patch_embed_backward, patch_embed_forward
from ..layers.quant import Int8Weight, quantize_weight
from ..layers.rope import rope_angles_forward, rope_backward, rope_forward, rope_mixed_freqs, rope_positions
from . import timing, torch_ref

LAYERS = ("patch_embed", "linear", "layernorm", "gelu", "gelu_tanh", "softmax", "attention", "rope", "attention_rope",
          "mlp", "block", "linear_fp16", "linear_bf16", "linear_int8")
LOWP = {"linear_fp16": "fp16", "linear_bf16": "bf16"}  # mixed precision vs torch.autocast (CPU, or CUDA)

# (rows compared) tolerance of tinyvit float32 vs PyTorch float32, max|a-b| / max|b|
TOL = {"float32": 1e-4, "float64": 1e-10}
# the lower-precision rows: fp16 / bf16 against torch.autocast (rounding at other places), int8 (tinyvit's static
# int8 and PyTorch's dynamic int8, forward only) against the float32 layer
TOL_LAYER = {"linear_fp16": 5e-3, "linear_bf16": 3e-2, "linear_int8": 3e-2}


@contextmanager
def environ(**env):
    """Run with these environment variables set (``TINYVIT_FUSED``, ``TINYVIT_NUMBA``), restoring them after."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fused(on: bool):
    """Run with the fused kernels on or off (``TINYVIT_FUSED``), restoring the setting after."""
    return environ(TINYVIT_FUSED="1" if on else "0")


# the variants that are tinyvit's own layer run with a switch of tinyvit.layers.kernels.path() turned
ENV_VARIANTS = {"NumPy blocks (no numba)": {"TINYVIT_NUMBA": "0"},
                "reference (no numba)": {"TINYVIT_FUSED": "0"}}


def _with_env(fn, env):
    if fn is None:
        return None

    def run(*args):
        with environ(**env):
            return fn(*args)
    return run


# ---------------------------------------------------------------- the losing NumPy variants
def linear_stacked_forward(x, w, b):
    """What NumPy does with ``x @ w.T`` for a 3-D ``x``: B products of (N, in) @ (in, out)."""
    return x @ w.T + b


def softmax_plain_forward(x):
    """The first version: three (..., N) temporaries (shifted, exp, out)."""
    shifted = x - x.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def softmax_plain_backward(dout, s):
    return s * (dout - (dout * s).sum(axis=-1, keepdims=True))


def attention_scores_einsum(q, k, scale):
    """``q @ k^T`` through einsum: NumPy's einsum does not reach BLAS for batched products."""
    return np.einsum("bhnd,bhmd->bhnm", q, k) * scale


# ---------------------------------------------------------------- cases
def _rng_arrays(seed, *shapes, dtype):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _rope_angles(heads, grid, head_size, dtype):
    """RoPE-Mixed angles at their initial frequencies, ``(NH, Np, hs/2)`` (block 0 of a fresh model)."""
    freqs = rope_mixed_freqs(head_size, heads, 1, 10.0, np.random.default_rng(2))[:, 0]  # (2, NH, hs/2)
    return rope_angles_forward(freqs, rope_positions(grid, grid))[0].astype(dtype)


def _block_params(dim, hidden, dtype, seed=1):
    rng = np.random.default_rng(seed)
    shapes = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
              "attn.qkv.bias": (3 * dim,), "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
              "norm2.weight": (dim,), "norm2.bias": (dim,), "mlp.fc1.weight": (hidden, dim),
              "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,)}
    p = {}
    for k, s in shapes.items():
        if k.endswith("norm1.weight") or k.endswith("norm2.weight"):
            p[k] = (1.0 + 0.1 * rng.standard_normal(s)).astype(dtype)
        else:
            p[k] = (0.02 * rng.standard_normal(s) * (5.0 if k.endswith("bias") else 1.0)).astype(dtype)
    return p


class Case:
    """One layer at one shape: host inputs, and functions per engine."""

    def __init__(self, layer: str, model: str, batch: int, dtype: str, shape_cfg: dict | None = None):
        cfg = dict(flops.PRESETS[model]) if shape_cfg is None else dict(shape_cfg)
        self.layer, self.model, self.batch, self.dtype = layer, model, batch, dtype
        b, d, f, nh = batch, cfg["dim"], cfg["mlp_dim"], cfg["heads"]
        p_size, img = cfg["patch_size"], cfg["image_size"]
        n = (img // p_size) ** 2 + 1
        self.tokens, self.dim, self.heads, self.hidden = n, d, nh, f
        self.kwargs = {}
        if layer == "patch_embed":
            x, w, bias = _rng_arrays(0, (b, 3, img, img), (d, 3, p_size, p_size), (d,), dtype=dtype)
            self.inputs, self.out_shape = {"x": x, "w": w * 0.05, "b": bias}, (b, n - 1, d)
            self.shape = f"({b}, 3, {img}, {img}) -> ({b}, {n - 1}, {d})"
            fl = flops.linear_flops(b * (n - 1), 3 * p_size * p_size, d)
        elif layer in ("linear", "linear_fp16", "linear_bf16", "linear_int8"):
            x, w, bias = _rng_arrays(0, (b, n, d), (f, d), (f,), dtype=dtype)
            self.inputs, self.out_shape = {"x": x, "w": w * 0.05, "b": bias}, (b, n, f)
            self.shape = f"({b}, {n}, {d}) @ ({d}, {f})"
            fl = flops.linear_flops(b * n, d, f)
        elif layer == "layernorm":
            x, w, bias = _rng_arrays(0, (b, n, d), (d,), (d,), dtype=dtype)
            self.inputs, self.out_shape = {"x": x * 2.0 + 0.5, "w": w, "b": bias}, (b, n, d)
            self.shape = f"({b}, {n}, {d})"
            fl = flops.elementwise_flops("layernorm", b * n * d)
        elif layer in ("gelu", "gelu_tanh"):
            (x,) = _rng_arrays(0, (b, n, f), dtype=dtype)
            self.inputs, self.out_shape = {"x": x * 2.0}, (b, n, f)
            self.shape = f"({b}, {n}, {f})"
            fl = flops.elementwise_flops("gelu", b * n * f)
        elif layer == "softmax":
            (x,) = _rng_arrays(0, (b, nh, n, n), dtype=dtype)
            self.inputs, self.out_shape = {"x": x * 3.0}, (b, nh, n, n)
            self.shape = f"({b}, {nh}, {n}, {n})"
            fl = flops.elementwise_flops("softmax", b * nh * n * n)
        elif layer == "rope":  # turning one of q, k: (B, NH, N, hs), RoPE-Mixed's per-head angles
            hs = d // nh
            (x,) = _rng_arrays(0, (b, nh, n, hs), dtype=dtype)
            self.inputs = {"x": x, "angles": _rope_angles(nh, img // p_size, hs, dtype)}
            self.out_shape = (b, nh, n, hs)
            self.shape = f"({b}, {nh}, {n}, {hs}), angles ({nh}, {n - 1}, {hs // 2})"
            fl = flops.elementwise_flops("rope", b * nh * (n - 1) * hs)
        elif layer in ("attention", "attention_rope", "mlp", "block"):
            (x,) = _rng_arrays(0, (b, n, d), dtype=dtype)
            self.inputs, self.out_shape = {"x": x}, (b, n, d)
            self.params = _block_params(d, f, dtype)
            self.shape = f"({b}, {n}, {d}), NH={nh}, F={f}"
            if layer == "attention_rope":  # attention with q and k turned (pos_embed="rope_mixed")
                self.params["angles"] = _rope_angles(nh, img // p_size, d // nh, dtype)
                self.shape = f"({b}, {n}, {d}), NH={nh}, RoPE-Mixed"
            a, r = flops.attention_flops(b, n, d), flops.elementwise_flops("rope", 2 * b * n * d)
            fl = {"attention": a, "attention_rope": (a[0] + r[0], a[1] + r[1]), "mlp": flops.mlp_flops(b, n, d, f),
                  "block": flops.block_flops(b, n, d, f)}[layer]
        else:
            raise ValueError(f"unknown layer {layer!r}; layers: {LAYERS}")
        self.flops = {"forward": fl[0], "backward": fl[1]}
        self.dout = _rng_arrays(7, self.out_shape, dtype=dtype)[0]

    # ------------------------------------------------------------ tinyvit
    def tinyvit_fns(self, backend_name: str, variant: str = "tinyvit"):
        """``(forward() -> out, backward() -> dx)`` on a backend; backward reuses one forward's cache."""
        if variant in ENV_VARIANTS:
            be, fwd, bwd = self.tinyvit_fns(backend_name)
            return be, _with_env(fwd, ENV_VARIANTS[variant]), _with_env(bwd, ENV_VARIANTS[variant])
        be = get_backend(backend_name)
        a = {k: be.asarray(v) for k, v in self.inputs.items()}
        dout = be.asarray(self.dout)
        p = {k: be.asarray(v) for k, v in getattr(self, "params", {}).items()}
        layer, heads = self.layer, self.heads
        if layer == "patch_embed":
            fwd = lambda: patch_embed_forward(a["x"], a["w"], a["b"])  # noqa: E731
            bwd = lambda c: patch_embed_backward(dout, c)[0]  # noqa: E731
        elif layer == "linear":
            if variant == "stacked 3-D matmul":
                fwd = lambda: (linear_stacked_forward(a["x"], a["w"], a["b"]), None)  # noqa: E731
                bwd = None
            else:
                fwd = lambda: linear_forward(a["x"], a["w"], a["b"])  # noqa: E731
                bwd = lambda c: linear_backward(dout, c)[0]  # noqa: E731
        elif layer in LOWP:
            fwd = lambda: linear_forward(a["x"], a["w"], a["b"], LOWP[layer])  # noqa: E731
            bwd = lambda c: linear_backward(dout, c)[0]  # noqa: E731
        elif layer == "linear_int8":  # static int8: the input scale from this input's range (calibration)
            q, s = quantize_weight(self.inputs["w"])
            w8 = Int8Weight(be.asarray(q), be.asarray(s), be.asarray(np.float32(np.abs(self.inputs["x"]).max() / 127)))
            fwd = lambda: linear_forward(a["x"], w8, a["b"])  # noqa: E731
            bwd = None
        elif layer == "layernorm":
            fwd = lambda: layernorm_forward(a["x"], a["w"], a["b"], 1e-6)  # noqa: E731
            bwd = lambda c: layernorm_backward(dout, c)[0]  # noqa: E731
        elif layer in ("gelu", "gelu_tanh"):
            approx = "none" if layer == "gelu" else "tanh"
            if variant == "reference (plain formula)":
                fwd = lambda: (gelu_reference_forward(a["x"], approx), GeluCache(a["x"], approx))  # noqa: E731
                bwd = lambda c: gelu_reference_backward(dout, c)  # noqa: E731
            else:
                fwd = lambda: gelu_forward(a["x"], approx)  # noqa: E731
                bwd = lambda c: gelu_backward(dout, c)  # noqa: E731
        elif layer == "softmax":
            if variant == "plain (3 temporaries)":
                fwd = lambda: (lambda s: (s, s))(softmax_plain_forward(a["x"]))  # noqa: E731
                bwd = lambda s: softmax_plain_backward(dout, s)  # noqa: E731
            else:
                fwd = lambda: softmax_forward(a["x"])  # noqa: E731
                bwd = lambda c: softmax_backward(dout, c)  # noqa: E731
        elif layer == "attention":
            if variant == FLASH_VARIANT:
                fwd = lambda: flash_attention_forward(a["x"], p["attn.qkv.weight"], p["attn.qkv.bias"],  # noqa: E731
                                                      p["attn.proj.weight"], p["attn.proj.bias"], heads)
                bwd = lambda c: flash_attention_backward(dout, c)[0]  # noqa: E731
            elif variant == "scores by einsum":
                def fwd():
                    q = a["x"].reshape(self.batch, self.tokens, heads, -1).transpose(0, 2, 1, 3)
                    return attention_scores_einsum(q, q, 1.0 / math.sqrt(q.shape[-1])), None
                bwd = None
            else:
                fwd = lambda: attention_forward(a["x"], p["attn.qkv.weight"], p["attn.qkv.bias"],  # noqa: E731
                                                p["attn.proj.weight"], p["attn.proj.bias"], heads)
                bwd = lambda c: attention_backward(dout, c)[0]  # noqa: E731
        elif layer == "rope":
            fwd = lambda: rope_forward(a["x"], a["angles"], 1)  # noqa: E731
            bwd = lambda c: rope_backward(dout, c)[0]  # noqa: E731
        elif layer == "attention_rope":
            fwd = lambda: attention_forward(a["x"], p["attn.qkv.weight"], p["attn.qkv.bias"],  # noqa: E731
                                            p["attn.proj.weight"], p["attn.proj.bias"], heads,
                                            rope_angles=p["angles"], num_prefix=1)
            bwd = lambda c: attention_backward(dout, c)[0]  # noqa: E731
        elif layer == "mlp":
            fwd = lambda: mlp_forward(a["x"], p["mlp.fc1.weight"], p["mlp.fc1.bias"], p["mlp.fc2.weight"],  # noqa: E731
                                      p["mlp.fc2.bias"])
            bwd = lambda c: mlp_backward(dout, c)[0]  # noqa: E731
        else:
            fwd = lambda: block_forward(a["x"], {k: p[k] for k in BLOCK_KEYS}, heads, 1e-6)  # noqa: E731
            bwd = lambda c: block_backward(dout, c)[0]  # noqa: E731
        return be, fwd, bwd

    # ------------------------------------------------------------ PyTorch
    def torch_fns(self, device: str):
        torch = torch_ref.import_torch()
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("PyTorch sees no CUDA device")
        F = torch.nn.functional
        # every input and parameter requires grad, so the backward computes what tinyvit's does (dx and dparams)
        t = {k: torch.tensor(v, device=device, requires_grad=True) for k, v in self.inputs.items()}
        p = {k: torch.tensor(v, device=device, requires_grad=True) for k, v in getattr(self, "params", {}).items()}
        wrt = list(t.values()) + list(p.values())
        dout = torch.tensor(self.dout, device=device)
        layer, heads = self.layer, self.heads
        if layer == "patch_embed":
            f = lambda: F.conv2d(t["x"], t["w"], t["b"], stride=t["w"].shape[-1]).flatten(2).transpose(1, 2)  # noqa: E731
        elif layer == "linear":
            f = lambda: F.linear(t["x"], t["w"], t["b"])  # noqa: E731
        elif layer in LOWP:  # autocast: the product in fp16 / bf16, the result back in float32 for the comparison
            def f():
                with torch.autocast(device, dtype=getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[LOWP[layer]])):
                    out = F.linear(t["x"], t["w"], t["b"])
                return out.float()
        elif layer == "linear_int8":  # PyTorch's dynamic int8 linear (per-channel weights), forward only
            if device != "cpu":
                raise RuntimeError("torch.ao dynamic quantisation runs on the CPU only")
            from ..quantize.torch_anchor import dynamic_int8
            lin = torch.nn.Linear(self.dim, self.hidden)
            lin.weight.data, lin.bias.data = t["w"].detach().clone(), t["b"].detach().clone()
            qlin = dynamic_int8(torch.nn.Sequential(lin), per_channel=True)
            x_in = t["x"].detach()

            def fwd():
                with torch.no_grad():
                    return qlin(x_in)
            return fwd, None, F.linear(t["x"], t["w"], t["b"])  # the float layer: the reference
        elif layer == "layernorm":
            f = lambda: F.layer_norm(t["x"], (self.dim,), t["w"], t["b"], 1e-6)  # noqa: E731
        elif layer in ("gelu", "gelu_tanh"):
            f = lambda: F.gelu(t["x"], approximate="none" if layer == "gelu" else "tanh")  # noqa: E731
        elif layer == "softmax":
            f = lambda: t["x"].softmax(dim=-1)  # noqa: E731
        elif layer == "attention":
            f = lambda: torch_ref.attention(t["x"], p, "", heads, torch)  # noqa: E731
        elif layer == "rope":
            f = lambda: torch_ref.rope(t["x"], t["angles"], 1, torch)  # noqa: E731
        elif layer == "attention_rope":
            f = lambda: torch_ref.attention(t["x"], p, "", heads, torch, rope_angles=p["angles"])  # noqa: E731
        elif layer == "mlp":
            f = lambda: torch_ref.mlp(t["x"], p, "", "none", torch)  # noqa: E731
        else:
            f = lambda: torch_ref.block(t["x"], p, "", heads, 1e-6, "none", torch)  # noqa: E731

        def fwd():
            with torch.no_grad():
                return f()

        out = f()

        def bwd():
            return torch.autograd.grad(out, wrt, dout, retain_graph=True, allow_unused=True)[0]  # dx, and dparams

        return fwd, bwd, out

    def torch_reference(self):
        """PyTorch CPU output and dx on the host, float64 arrays: the check every variant must pass."""
        _, bwd, out = self.torch_fns("cpu")
        return out.detach().double().numpy(), None if bwd is None else bwd().double().numpy()


def _host(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().double().numpy()
    return np.asarray(get_backend("cupy").to_host(x) if not isinstance(x, np.ndarray) else x, dtype=np.float64)


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


FLASH_VARIANT = f"flash (tiles of {DEFAULT_BLOCK})"  # attn_impl="flash": not a loser, the memory-saving choice
NUMPY_VARIANTS = {
    "linear": ("stacked 3-D matmul",),
    "layernorm": ("reference (no numba)",),
    "gelu": ("NumPy blocks (no numba)", "reference (plain formula)"),
    "gelu_tanh": ("NumPy blocks (no numba)", "reference (plain formula)"),
    "softmax": ("reference (no numba)", "plain (3 temporaries)"),
    "attention": ("scores by einsum", FLASH_VARIANT),
}


def bench_layer(case: Case, backends, repeats: int, skipped: dict) -> list:
    """Forward and backward of one case on every backend and NumPy variant, checked, then timed interleaved."""
    ref_out = ref_dx = None
    try:
        ref_out, ref_dx = case.torch_reference()
    except RuntimeError as exc:
        skipped["torch-cpu"] = str(exc)
    runs = {}  # name -> (kind, fwd, bwd, xp)
    for backend in backends:
        try:
            if backend in ("numpy", "cupy"):
                variants = ["tinyvit"] + (list(NUMPY_VARIANTS.get(case.layer, ())) if backend == "numpy" else [])
                for v in variants:
                    be, fwd, bwd = case.tinyvit_fns(backend, v)
                    xp = be.xp if backend == "cupy" else None
                    runs[backend if v == "tinyvit" else f"{backend}: {v}"] = (fwd, bwd, xp)
            else:
                fwd, bwd, _ = case.torch_fns("cuda" if backend == "torch-cuda" else "cpu")
                runs[backend] = (fwd, bwd, None)
        except RuntimeError as exc:
            skipped[backend] = str(exc)
    rows = []
    checks = {}
    caches = {}
    for name, (fwd, bwd, xp) in runs.items():
        out, cache = (fwd(), None) if name.startswith("torch") else fwd()
        caches[name] = cache
        if ref_out is None:
            continue
        if case.layer == "attention" and "einsum" in name:
            # checks q k^T against the engine's own product on the same input
            q = case.inputs["x"].astype(np.float64).reshape(case.batch, case.tokens, case.heads, -1).transpose(0, 2, 1, 3)
            want = q @ q.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
            checks[name] = _rel(_host(out), want)
        else:
            checks[name] = _rel(_host(out), ref_out)
            if bwd is not None and ref_dx is not None:
                dx = bwd() if name.startswith("torch") else bwd(cache)
                checks[name] = max(checks[name], _rel(_host(dx), ref_dx))
        tol = TOL_LAYER.get(case.layer, TOL[case.dtype])
        if checks[name] > tol:
            raise AssertionError(f"{case.layer} {name}: relative error {checks[name]:.1e} vs PyTorch "
                                 f"> {tol:.0e}; not timing a wrong result")
    for pass_ in ("forward", "backward"):
        fns, xps = {}, {}
        for name, (fwd, bwd, xp) in runs.items():
            if pass_ == "forward":
                fns[name] = fwd
            elif bwd is not None:
                fns[name] = bwd if name.startswith("torch") else (lambda b=bwd, c=caches[name]: b(c))
            xps[name] = xp
        times = timing.time_calls(fns, repeats, warmup=1, xp_of=xps.get)
        torch_median = times["torch-cpu"].median if "torch-cpu" in times else None
        for name, t in times.items():
            rows.append({"layer": case.layer, "model": case.model, "batch": case.batch, "shape": case.shape,
                         "dtype": case.dtype, "pass": pass_, "backend": name, **t.to_dict(),
                         "gflops": case.flops[pass_] / t.median / 1e9, "check_rel_err": checks.get(name),
                         "vs_torch_cpu": t.median / torch_median if torch_median else None})
    return rows


def crossover(layer: str, model: str, batches, dtype: str, repeats: int) -> dict:
    """The smallest batch at which tinyvit on CuPy beats tinyvit on NumPy, forward + backward."""
    out = {}
    for b in batches:
        case = Case(layer, model, b, dtype)
        times = {}
        for backend in ("numpy", "cupy"):
            be, fwd, bwd = case.tinyvit_fns(backend)
            _, cache = fwd()
            step = (lambda f=fwd, g=bwd, c=cache: (f(), g(c) if g else None))
            xp = be.xp if backend == "cupy" else None
            times[backend] = timing.time_calls({backend: step}, repeats, 1, lambda n, x=xp: x)[backend].median
        out[b] = times
        if times["cupy"] < times["numpy"]:
            return {"batch": b, "elements": int(np.prod(case.out_shape)), "times": out}
    return {"batch": None, "times": out}
