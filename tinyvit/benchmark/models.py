"""Whole-model benchmarks: a training step (forward, loss, backward) and an inference
forward, tinyvit (NumPy, CuPy) next to eager PyTorch (CPU, CUDA), each checked against
the others before it is timed; peak memory; the time split by layer; the token sweep.
"""
from __future__ import annotations

import cProfile
import pstats

import numpy as np

from . import flops
from ..backend import get_backend
from ..layers.loss import softmax_cross_entropy
from ..model import ViTConfig, VisionTransformer
from . import timing, torch_ref
from .layers import environ

# Column names: (engine, device). "numpy" and "cupy" are tinyvit; "torch-cpu" and "torch-cuda" PyTorch eager.
BACKENDS = ("numpy", "torch-cpu", "cupy", "torch-cuda")
# tinyvit on NumPy with a switch of tinyvit.layers.kernels.path() turned (asked for by name, not run by default)
NUMPY_ENGINE_VARIANTS = {"numpy-nonumba": {"TINYVIT_NUMBA": "0"}, "numpy-reference": {"TINYVIT_FUSED": "0"}}

# Tolerances of the cross-engine check (max |a - b| / max |b|), by dtype: float32 sums in
# another order differ by ~1e-6 relative per op, which a 12-block model grows to ~1e-4.
CHECK_TOL = {"float32": 2e-3, "float64": 1e-9}


def build_config(model, **overrides) -> ViTConfig:
    """A :class:`ViTConfig` from a preset name (``vit_ti16``...) or a dict, with overrides."""
    base = dict(flops.PRESETS[model]) if isinstance(model, str) else dict(model)
    base.update(overrides)
    return ViTConfig(**base)


class Engine:
    """One backend's training step and inference forward over the same weights and batch."""

    def __init__(self, backend: str, config: ViTConfig, batch: int, dtype: str, seed: int = 0):
        self.name, self.config, self.batch, self.dtype = backend, config, batch, dtype
        rng = np.random.default_rng(seed)
        h, w = config.image_size
        x_host = rng.standard_normal((batch, config.channels, h, w)).astype(dtype)
        y_host = rng.integers(0, config.num_classes, size=batch)
        weights = VisionTransformer.from_config(config, backend="numpy", dtype="float64", seed=seed).state_dict()
        self.xp = None
        self.env = NUMPY_ENGINE_VARIANTS.get(backend)
        if backend in ("numpy", "cupy") or self.env:
            self.backend = get_backend("numpy" if self.env else backend)
            self.model = VisionTransformer.from_config(config, backend=self.backend, dtype=dtype, seed=seed)
            self.model.load_state_dict(weights)
            self.x = self.backend.asarray(x_host, dtype=dtype)
            self.y = self.backend.asarray(y_host)
            self.xp = self.backend.xp if backend == "cupy" else None
        else:
            torch = self.torch = torch_ref.import_torch()
            device = "cuda" if backend == "torch-cuda" else "cpu"
            if device == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("PyTorch sees no CUDA device")
            self.params = torch_ref.torch_params(weights, torch, device, dtype)
            self.x = torch.tensor(x_host, device=device)
            self.y = torch.tensor(y_host, device=device)
            self.device = device

    # ---------------------------------------------------------------- the timed calls
    def train_step(self):
        """Forward, loss, backward; the gradients stay in ``model.grads`` / ``param.grad``."""
        if self.env:
            with environ(**self.env):
                return self._train_step()
        return self._train_step()

    def _train_step(self):
        if hasattr(self, "model"):
            logits = self.model.forward(self.x, train=True)
            loss, dlogits = softmax_cross_entropy(logits, self.y)
            self.model.backward(dlogits, keep_cache=False)  # free each block's cache once used, as torch does
            return loss
        for p in self.params.values():
            p.grad = None  # zero_grad(set_to_none=True), as an optimiser step would
        logits = torch_ref.vit_forward(self.x, self.params, self.config, self.torch)
        loss = self.torch.nn.functional.cross_entropy(logits, self.y)
        loss.backward()
        return loss

    def inference(self):
        if self.env:
            with environ(**self.env):
                return self._inference()
        return self._inference()

    def _inference(self):
        if hasattr(self, "model"):
            return self.model.forward(self.x, train=False, keep_cache=False)  # as torch.no_grad()
        with self.torch.no_grad():
            return torch_ref.vit_forward(self.x, self.params, self.config, self.torch)

    def clear(self):
        """Drop gradients (and nothing else) so a memory measurement starts from weights + batch."""
        if hasattr(self, "model"):
            self.model.grads = {}
        else:
            for p in self.params.values():
                p.grad = None

    # ---------------------------------------------------------------- results on the host
    def logits_host(self):
        out = self.inference()
        return np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else self.model.backend.to_host(out),
                          dtype=np.float64)

    def grads_host(self) -> dict:
        self.train_step()
        if hasattr(self, "model"):
            return {k: np.asarray(self.model.backend.to_host(v), dtype=np.float64) for k, v in self.model.grads.items()}
        return {k: p.grad.detach().cpu().double().numpy() for k, p in self.params.items()}

    def peak_bytes(self) -> int:
        self.clear()
        if self.name == "numpy" or self.env:
            return timing.numpy_peak_bytes(self.train_step)
        if self.name == "cupy":
            return timing.cupy_peak_bytes(self.train_step, self.xp)
        if self.name == "torch-cuda":
            return timing.torch_cuda_peak_bytes(self.train_step, self.torch)
        return timing.torch_cpu_peak_bytes(self.train_step, self.torch)

    def synchronize(self):
        if self.name == "cupy":
            self.backend.synchronize()
        elif self.name == "torch-cuda":
            self.torch.cuda.synchronize()


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def check_engines(engines: dict, dtype: str) -> dict:
    """Compare logits and every gradient of each engine with the first one; raise if any differs.

    Returns ``{engine: worst relative error}``.
    """
    tol = CHECK_TOL[dtype]
    names = list(engines)
    ref_logits = engines[names[0]].logits_host()
    ref_grads = engines[names[0]].grads_host()
    worst = {names[0]: 0.0}
    for name in names[1:]:
        errors = {"logits": rel_err(engines[name].logits_host(), ref_logits)}
        grads = engines[name].grads_host()
        errors.update({k: rel_err(grads[k], ref_grads[k]) for k in ref_grads})
        key = max(errors, key=errors.get)
        if errors[key] > tol:
            raise AssertionError(f"{name} disagrees with {names[0]} on {key}: relative error {errors[key]:.2e} "
                                 f"> {tol:.0e}; not timing a wrong result")
        worst[name] = errors[key]
    return worst


def make_engines(config, batch, dtype, backends, skipped: dict) -> dict:
    """Build the engines that can run here; record why the others cannot in ``skipped``."""
    engines = {}
    for name in backends:
        try:
            engines[name] = Engine(name, config, batch, dtype)
        except RuntimeError as exc:
            skipped[name] = str(exc)
    return engines


def bench_model(model, batch: int, dtype: str, backends, repeats: int, peak_flops: float | None,
                memory: bool = True, split: bool = False, check: bool = True, name: str | None = None) -> dict:
    """Train step and inference of one model at one batch size on every backend, interleaved."""
    config = build_config(model)
    name = name or (model if isinstance(model, str) else "custom")
    skipped = {}
    engines = make_engines(config, batch, dtype, backends, skipped)
    errors = check_engines(engines, dtype) if check and len(engines) > 1 else {}
    step_flops = flops.train_step_flops(config, batch)
    infer_flops = flops.forward_flops(config, batch)
    rows = []
    for kind, flop_count in (("train", step_flops), ("infer", infer_flops)):
        fns = {e: (engines[e].train_step if kind == "train" else engines[e].inference) for e in engines}
        fns = {e: _synced(fn, engines[e]) for e, fn in fns.items()}
        times = timing.time_calls(fns, repeats, warmup=1,
                                  xp_of=lambda e: engines[e].xp if e == "cupy" else None)
        for e, t in times.items():
            row = {"model": name, "batch": batch, "dtype": dtype, "kind": kind, "backend": e, **t.to_dict(),
                   "images_per_s": batch / t.median, "gflops": flop_count / t.median / 1e9,
                   "check_rel_err": errors.get(e)}
            if peak_flops and (e in ("numpy", "torch-cpu") or e in NUMPY_ENGINE_VARIANTS):
                row["fraction_of_peak"] = flop_count / t.median / peak_flops
            rows.append(row)
    if memory:
        for e, engine in engines.items():
            peak = engine.peak_bytes()
            for row in rows:
                if row["backend"] == e and row["kind"] == "train":
                    row["peak_bytes"] = peak
    result = {"rows": rows, "skipped": skipped, "flops": {"train": step_flops, "infer": infer_flops}}
    if split:
        result["split"] = {e: layer_split(engines[e]) for e in engines
                           if e in ("numpy", "torch-cpu") or e in NUMPY_ENGINE_VARIANTS}
    return result


def _synced(fn, engine):
    if engine.name in ("cupy", "torch-cuda"):
        def run():
            fn()
            engine.synchronize()
        return run
    return fn


# ---------------------------------------------------------------- where the time goes
# tinyvit's layer functions (file, function) -> the row their cumulative time goes to.
TINYVIT_SPLIT = {
    ("linear.py", "linear_forward"): "linear", ("linear.py", "linear_backward"): "linear",
    ("attention.py", "softmax_forward"): "softmax", ("attention.py", "softmax_backward"): "softmax",
    ("gelu.py", "gelu_forward"): "gelu", ("gelu.py", "gelu_backward"): "gelu",
    ("layernorm.py", "layernorm_forward"): "layernorm", ("layernorm.py", "layernorm_backward"): "layernorm",
}
ATTENTION_CORE = "attention core (q k^T, att v, reshapes)"
TORCH_SPLIT = {
    "aten::addmm": "linear", "aten::mm": "linear", "aten::linear": "linear",
    "aten::bmm": ATTENTION_CORE,
    "aten::_softmax": "softmax", "aten::_softmax_backward_data": "softmax",
    "aten::gelu": "gelu", "aten::gelu_backward": "gelu",
    "aten::native_layer_norm": "layernorm", "aten::native_layer_norm_backward": "layernorm",
    "aten::convolution_backward": "patch embedding", "aten::_convolution": "patch embedding",
}


def layer_split(engine) -> dict:
    """Seconds of one training step per layer kind, from a profiler (cProfile / torch.profiler)."""
    engine.train_step()
    out = {}
    if engine.name == "numpy" or engine.env:
        prof = cProfile.Profile()
        prof.enable()
        engine.train_step()
        prof.disable()
        stats = pstats.Stats(prof).stats
        total = sum(tottime for (_, _, tottime, _, _) in stats.values())
        attention, inside_attention = 0.0, 0.0
        for (path, _, func), (_, _, _, cumtime, callers) in stats.items():
            name = path.replace("\\", "/").rsplit("/", 1)[-1]
            if name == "attention.py" and func in ("attention_forward", "attention_backward"):
                attention += cumtime
            row = TINYVIT_SPLIT.get((name, func))
            if row:
                out[row] = out.get(row, 0.0) + cumtime
                inside_attention += sum(c[3] for (_, _, caller), c in callers.items()
                                        if caller in ("attention_forward", "attention_backward"))
        out[ATTENTION_CORE] = max(attention - inside_attention, 0.0)  # the batched products and reshapes
        out["everything else"] = max(total - sum(out.values()), 0.0)
        out["total"] = total
        return out
    from torch.profiler import ProfilerActivity, profile

    from .timing import quiet_profiler_logs

    with quiet_profiler_logs(), profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.train_step()
    total = 0.0
    for ev in prof.key_averages():
        total += ev.self_cpu_time_total / 1e6
        row = TORCH_SPLIT.get(ev.key)
        if row:
            out[row] = out.get(row, 0.0) + ev.self_cpu_time_total / 1e6
    out["everything else"] = max(total - sum(out.values()), 0.0)
    out["total"] = total
    return out


# ---------------------------------------------------------------- the matmul peak
def matmul_peak(backends, dtype: str, size: int = 1024, repeats: int = 5) -> dict:
    """GFLOP/s of a ``size^3`` matrix product on each CPU backend: the machine's practical limit."""
    out = {}
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    fns = {}
    if "numpy" in backends:
        fns["numpy"] = lambda: a @ b
    if "torch-cpu" in backends:
        try:
            torch = torch_ref.import_torch()
            at, bt = torch.from_numpy(a), torch.from_numpy(b)
            fns["torch-cpu"] = lambda: at @ bt
        except RuntimeError:
            pass
    times = timing.time_calls(fns, repeats, warmup=2)
    for name, t in times.items():
        out[name] = 2 * size ** 3 / t.min / 1e9
    return out


# ---------------------------------------------------------------- tokens sweep
def token_sweep(model: str, image_sizes, batch: int, dtype: str, backends, repeats: int) -> list:
    """Training-step time as the token count grows (image size / patch), with the attention share."""
    rows = []
    for size in image_sizes:
        config = build_config(model, image_size=size)
        skipped = {}
        engines = make_engines(config, batch, dtype, [b for b in backends if b in ("numpy", "torch-cpu")], skipped)
        times = timing.time_calls({e: engines[e].train_step for e in engines}, repeats, warmup=1)
        split = layer_split(engines["numpy"]) if "numpy" in engines else {}
        attn_time = sum(v for k, v in split.items() if k.startswith("attention core") or k == "softmax")
        for e, t in times.items():
            rows.append({"model": model if isinstance(model, str) else "custom", "image_size": size, "tokens": config.num_tokens, "batch": batch,
                         "backend": e, **t.to_dict(), "attention_flop_share": flops.attention_share(config),
                         "numpy_attention_time_share": attn_time / split["total"] if split else None})
    return rows


# ---------------------------------------------------------------- cheaper attention: plain, flash, windows
def attention_variants(config: ViTConfig, windows=()) -> dict:
    """``{label: ViTConfig overrides}``: plain, flash and, per window size M that divides the
    patch grid, windowed attention (shifted on alternate blocks, as Swin)."""
    out = {"plain": {}, "flash": {"attn_impl": "flash"}}
    for m in windows:
        if "attn_window" in ViTConfig.__dataclass_fields__ and all(g % m == 0 for g in config.grid) \
                and m < min(config.grid):
            out[f"window {m} + shift"] = {"attn_window": m, "attn_shift": True}
    return out


def attention_sweep(model, image_sizes, batch: int, dtype: str, repeats: int, windows=(), torch: bool = True,
                    memory: bool = True, check: bool = True, variants=None, on_size=None) -> list:
    """A training step (forward, loss, backward) of the same ViT with each attention, per image size.

    All variants of one size run in one process, interleaved (``timing.time_calls``); flash is
    first checked equal to plain (logits and every gradient), since it computes the same
    function. Each row: median/min/max time, peak bytes (tracemalloc), the ratio of both to
    plain's, and the training-step matrix FLOPs of that attention. ``variants`` keeps only those
    labels (plain always runs); ``check=False`` skips the check (long runs that checked at a
    smaller size); ``on_size(rows)`` is called after each size (scripts print as they go).
    """
    rows = []
    for size in image_sizes:
        base = build_config(model, image_size=size)
        chosen = attention_variants(base, windows)
        if variants:
            chosen = {k: v for k, v in chosen.items() if k == "plain" or k in variants or
                      (k.startswith("window") and "window" in variants)}
        engines = {label: Engine("numpy", build_config(model, image_size=size, **over), batch, dtype)
                   for label, over in chosen.items()}
        if check and "flash" in engines:
            check_engines({k: engines[k] for k in ("plain", "flash")}, dtype)
        fns = {label: e.train_step for label, e in engines.items()}
        if torch:
            try:
                engines["torch-cpu (plain)"] = Engine("torch-cpu", base, batch, dtype)
                fns["torch-cpu (plain)"] = engines["torch-cpu (plain)"].train_step
            except RuntimeError:
                pass
        times = timing.time_calls(fns, repeats, warmup=1)
        peaks = {label: e.peak_bytes() for label, e in engines.items()} if memory else {}
        for label, t in times.items():
            cfg = engines[label].config
            rows.append({"model": model if isinstance(model, str) else "custom", "image_size": size,
                         "tokens": cfg.num_tokens, "batch": batch, "variant": label, **t.to_dict(),
                         "peak_bytes": peaks.get(label),
                         "time_vs_plain": t.median / times["plain"].median,
                         "memory_vs_plain": (peaks[label] / peaks["plain"]) if peaks else None,
                         "train_gflop": flops.train_step_flops(cfg, batch) / 1e9, "checked": check})
        del engines
        if on_size is not None:
            on_size(rows)
    return rows
