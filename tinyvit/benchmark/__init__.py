"""``tinyvit bench``: what NumPy on a CPU and CuPy on a GPU cost, per layer and per model,
next to eager PyTorch on the same machine, in the same run.

Laid out like llm.c's ``dev/cuda``: realistic shapes (ViT-Ti/S/B at 224, N = 197, and a
CIFAR-size model), every variant checked against PyTorch before it is timed, the losing
variants kept and timed beside the winner, results written down in ``bench/README.md``.

Files: ``timing.py`` (interleaved timers, CUDA events, peak-memory meters), ``layers.py``
(per-layer cases and the NumPy variants), ``models.py`` (training step, inference, layer
split, token sweep), ``torch_ref.py`` (the PyTorch model), ``report.py`` (machine info,
tables, JSON, PNG). The parameter/FLOP calculator is :mod:`tinyvit.benchmark.flops`.

Variants tried on NumPy (median, ViT-Ti/16 shapes, batch 8, float32; bench/README.md has the tables):

- GELU exact: ``scipy.special.erf`` (the reference) 15-27 ms forward; A&S 7.1.26 from
  NumPy SIMD ufuncs over the whole array 13 ms (memory bound, 22 passes); the same in
  L2-sized blocks 2.9 ms (kept, :mod:`tinyvit.layers.kernels`); numexpr 30 ms (scalar ``expf``,
  no SIMD); numba without SVML 11 ms (scalar ``expf``): both lost. Since then (issue 16) numba with
  ``exp``/``erf`` written as polynomials vectorises (0.4-0.7 ms): the default path, :mod:`tinyvit.layers.kernels_numba`;
  the NumPy blocks and the references stay as variants (``NumPy blocks (no numba)``, ``reference (no numba)``).
- linear: ``x @ w.T`` on a 3-D ``x`` (a stack of B products) 4.2 ms vs one flattened
  ``(M, in) @ (in, out)`` 2.7 ms (kept).
- softmax: three temporaries vs exp/normalise in place (kept, ~15% faster, 2 fewer
  buffers); backward ``(dout * s).sum`` vs ``einsum`` row dot (kept, no (.., N) temporary).
- attention scores: batched ``matmul`` (kept) vs ``einsum`` (no BLAS: slower at N = 197).

Run ``tinyvit bench --help`` for the options; ``--smoke`` is the seconds-long form CI runs.
"""
from __future__ import annotations

import os
import sys
import time

from . import flops

QUICK = {"layers": ("vit_ti16",), "models": ("vit_ti16",), "batches": (8,), "repeats": 5}
FULL = {"layers": ("vit_ti16", "vit_s16", "vit_b16"), "models": ("cifar", "vit_ti16", "vit_s16", "vit_b16"),
        "batches": (1, 8, 32), "repeats": 5}
# The seconds-long form for CI: tiny shapes, one repeat, every variant still checked.
SMOKE_CFG = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64)
SWEEP_SIZES = {"quick": (64, 128, 224, 320), "full": (64, 128, 224, 320, 448, 640), "smoke": (16, 32)}
ATTENTION_SIZES = {"quick": (224, 448, 640), "smoke": (16, 32)}  # ViT-Ti/16: N = 197, 785, 1601
ALL_BACKENDS = ("numpy", "torch-cpu", "cupy", "torch-cuda")
# whole models only, by name: tinyvit-NumPy without the numba loops / with every reference formula
EXTRA_BACKENDS = ("numpy-nonumba", "numpy-reference")


def _csv(text, cast=str):
    return tuple(cast(t.strip()) for t in text.split(",") if t.strip())


def set_threads(threads: int | None) -> int:
    """Give PyTorch and tinyvit's kernels as many threads as NumPy's BLAS (or set all to ``threads``)."""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        threadpool_info = threadpool_limits = None
    if threads is not None and threadpool_limits is not None:
        threadpool_limits(limits=threads)
    if threads is None and threadpool_info is not None:
        blas = [d["num_threads"] for d in threadpool_info() if d.get("user_api") == "blas"]
        threads = blas[0] if blas else None
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        threads = torch.get_num_threads()
    except ImportError:
        pass
    threads = threads or 1
    os.environ["TINYVIT_THREADS"] = str(threads)  # tinyvit's CPU kernels (GELU) use as many as PyTorch
    return threads


def run_bench(args) -> int:
    """The ``tinyvit bench`` command; leaves ``TINYVIT_THREADS`` as it found it."""
    old = os.environ.get("TINYVIT_THREADS")
    try:
        return _run_bench(args)
    finally:
        if old is None:
            os.environ.pop("TINYVIT_THREADS", None)
        else:
            os.environ["TINYVIT_THREADS"] = old


def _run_bench(args) -> int:
    from . import layers as layer_bench
    from . import models as model_bench
    from . import report

    start = time.perf_counter()
    mode = "smoke" if args.smoke else ("full" if args.full else "quick")
    preset = FULL if args.full else QUICK
    backends = _csv(args.backends)
    bad = [b for b in backends if b not in ALL_BACKENDS + EXTRA_BACKENDS]
    if bad:
        raise ValueError(f"unknown backend(s) {bad}; choose from {ALL_BACKENDS + EXTRA_BACKENDS}")
    if args.dtype not in ("float32", "float64"):
        raise ValueError(f"--dtype must be float32 or float64, got {args.dtype!r}")
    repeats = args.repeats if args.repeats is not None else (1 if args.smoke else preset["repeats"])
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    batches = _csv(args.batch, int) if args.batch else ((2,) if args.smoke else preset["batches"])
    all_layers = layer_names = layer_bench.LAYERS
    if args.layers:
        layer_names = () if args.layers == "none" else _csv(args.layers)
        unknown = [n for n in layer_names if n not in all_layers]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown}; layers: {all_layers}")
    model_names = preset["models"]
    if args.models:
        model_names = () if args.models == "none" else _csv(args.models)
        unknown = [n for n in model_names if n not in flops.PRESETS]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; models: {sorted(flops.PRESETS)}")
    if args.smoke:
        model_names = ("smoke",) if model_names else ()
    threads = set_threads(args.threads)

    info = report.machine_info()
    print(f"# tinyvit bench ({mode}), {info['date']}\n")
    print(f"- machine: {info['cpu']}, {info['cores']} cores; BLAS: {report.blas_line(info)}; "
          f"PyTorch {info.get('torch')} with {threads} threads; GPU: {info['gpu']}")
    print(f"- numpy {info['numpy']}, scipy {info['scipy']}, dtype {args.dtype}, {repeats} repeats, "
          f"OPENBLAS_CORETYPE={info['OPENBLAS_CORETYPE']}\n")
    results = {"machine": info, "mode": mode, "dtype": args.dtype, "repeats": repeats, "threads": threads,
               "layers": [], "models": [], "split": {}, "sweep": [], "skipped": {}, "matmul_peak_gflops": {}}
    skipped = results["skipped"]

    # ---- layers
    if layer_names:
        shape_models = ("smoke",) if args.smoke else preset["layers"]
        layer_batches = batches if args.batch or args.smoke else (8,)
        for shape_model in shape_models:
            for batch in layer_batches:
                for name in layer_names:
                    cfg = SMOKE_CFG if shape_model == "smoke" else None
                    case = layer_bench.Case(name, shape_model, batch, args.dtype, cfg)
                    results["layers"] += layer_bench.bench_layer(
                        case, [b for b in backends if b not in EXTRA_BACKENDS], repeats, skipped)
        print("## Layers (forward, backward)\n")
        print(report.layer_table(results["layers"]) + "\n")
        if "cupy" in backends and "cupy" not in skipped:
            results["crossover"] = {n: layer_bench.crossover(n, shape_models[0], (1, 2, 4, 8, 16, 32, 64),
                                                             args.dtype, repeats) for n in layer_names}
            print("CuPy overtakes NumPy at batch: " + ", ".join(
                f"{n} {c['batch']}" for n, c in results["crossover"].items()) + "\n")
        else:
            why = skipped.get("cupy", "cupy not asked for")
            print(f"CuPy vs NumPy crossover: not measured ({why})\n")

    # ---- the compiled loops' first call
    elementwise = {"gelu", "gelu_tanh", "layernorm", "softmax"} & set(layer_names)
    why_not = "--smoke" if args.smoke else "--no-jit" if args.no_jit else \
        "no model and no GELU/LayerNorm/softmax row asked for" if not (model_names or elementwise) else None
    if why_not:
        print(f"First call of the compiled loops: not measured ({why_not})\n")
    else:
        results["jit"] = jit = first_call_cost()
        print("## First call of the compiled CPU loops (numba)\n")
        print(report.jit_table(jit) + "\n")

    # ---- whole models
    if model_names:
        peak = model_bench.matmul_peak(backends, args.dtype, size=256 if args.smoke else 1024, repeats=repeats + 2)
        results["matmul_peak_gflops"] = peak
        peak_flops = max(peak.values()) * 1e9 if peak else None
        for name in model_names:
            model = SMOKE_CFG if name == "smoke" else name
            for batch in batches:
                r = model_bench.bench_model(model, batch, args.dtype, backends, repeats, peak_flops,
                                            memory=not args.no_memory, split=True, name=name)
                results["models"] += r["rows"]
                skipped.update(r["skipped"])
                results["split"][f"{name} b{batch}"] = r.get("split", {})
        # the peak again after the models, keeping the better of the two: a busy moment only lowers it
        again = model_bench.matmul_peak(backends, args.dtype, size=256 if args.smoke else 1024, repeats=repeats + 2)
        peak = {k: max(v, again.get(k, 0.0)) for k, v in peak.items()}
        results["matmul_peak_gflops"] = peak
        best = max(peak.values()) * 1e9 if peak else None
        for row in results["models"]:
            if best and row["backend"] in ("numpy", "torch-cpu"):
                row["fraction_of_peak"] = row["gflops"] * 1e9 / best
        print("## Whole models: training step (forward, loss, backward) and inference forward\n")
        print("Matmul peak measured in this run (GFLOP/s, 1024^3 float32): "
              + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()) + "\n")
        print(report.model_table(results["models"]) + "\n")
        for key, split in results["split"].items():
            if split:
                print(f"### Training step split by layer, {key}\n")
                print(report.split_table(split) + "\n")

    # ---- token sweep
    if args.sweep or args.full or args.smoke:
        sweep_model = SMOKE_CFG if args.smoke else "vit_ti16"
        sizes = _csv(args.sizes, int) if args.sizes else SWEEP_SIZES[mode]
        results["sweep"] = model_bench.token_sweep(sweep_model, sizes, 1, args.dtype, backends, repeats)
        print("## Training step against token count (batch 1)\n")
        print(report.sweep_table(results["sweep"]) + "\n")
        if args.png:
            report.plot_sweep(results["sweep"], args.png)
            print(f"sweep plot written to {args.png}\n")
    # ---- cheaper attention: plain vs flash (vs windows), a training step at batch --batch
    if args.attention:
        att_model = SMOKE_CFG if args.smoke else "vit_ti16"
        sizes = _csv(args.sizes, int) if args.sizes else ATTENTION_SIZES["smoke" if args.smoke else "quick"]
        att_batch = batches[0] if args.batch else (2 if args.smoke else 8)
        windows = _csv(args.windows, int) if args.windows else ((2,) if args.smoke else (7, 8))
        results["attention"] = model_bench.attention_sweep(att_model, sizes, att_batch, args.dtype, repeats,
                                                           windows, torch="torch-cpu" in backends,
                                                           memory=not args.no_memory)
        print(f"## Cheaper attention: a training step per attention (batch {att_batch})\n")
        print(report.attention_table(results["attention"]) + "\n")
    # ---- fewer tokens, fewer heads: ToMe, pruned heads, PatchDropout against the plain model
    if args.fewer:
        from .fewer import fewer_sweep, fewer_table

        few_models = ("smoke",) if args.smoke else (_csv(args.models) if args.models and args.models != "none"
                                                    else ("vit_ti16", "vit_s16", "vit_b16"))
        few_batch = batches[0] if args.batch else (2 if args.smoke else 8)
        rs = _csv(args.tome_r, int) if args.tome_r else None
        results["fewer"] = []
        for name in few_models:
            results["fewer"] += fewer_sweep(SMOKE_CFG if name == "smoke" else name, few_batch, args.dtype, repeats,
                                            rs, torch="torch-cpu" in backends)
        print(f"## Fewer tokens, fewer heads: images/s against the plain model (batch {few_batch})\n")
        print(fewer_table(results["fewer"]) + "\n")
    if skipped:
        print("Not measured: " + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) + "\n")
    results["wall_s"] = time.perf_counter() - start
    if args.json:
        report.write_json(args.json, results)
        print(f"results written to {args.json}")
    print(f"({results['wall_s']:.0f} s)")
    sys.stdout.flush()
    return 0


_FIRST_CALL = """
import json, time
t0 = time.perf_counter()
from tinyvit.layers import kernels
t1 = time.perf_counter()
path = kernels.path()
t2 = time.perf_counter()
compile_s = kernels.compile_all()
print(json.dumps({"path": path, "import_tinyvit_s": t1 - t0, "import_numba_s": t2 - t1, "compile_s": compile_s}))
"""


def first_call_cost() -> dict:
    """What the first float32 layer call costs a fresh process: numba's import, then compiling every loop
    with an empty cache (a fresh ``NUMBA_CACHE_DIR``), then the same from the cache in a second process."""
    import json
    import subprocess
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for kind in ("cold cache", "warm cache"):
            run = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env, capture_output=True, text=True,
                                 timeout=600)
            if run.returncode != 0:
                return {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "failed"}
            out[kind] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="per-layer and whole-model benchmarks: NumPy/CuPy vs PyTorch",
        description="Time every layer (forward, backward) and whole ViTs (training step, inference) on "
                    "tinyvit-NumPy, PyTorch CPU and, with a GPU, tinyvit-CuPy and PyTorch CUDA, each checked "
                    "against PyTorch first. Default: a quick preset (~1 minute on 2 cores).")
    p.add_argument("--full", action="store_true", help="ViT-Ti/S/B and CIFAR models at batch 1, 8, 32, all layers "
                   "at Ti/S/B shapes, and the token sweep (long)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat: checks every variant (CI)")
    p.add_argument("--layers", help="comma list of layers, or 'none' (default: all)")
    p.add_argument("--models", help=f"comma list of {sorted(flops.PRESETS)}, or 'none'")
    p.add_argument("--batch", help="comma list of batch sizes (default 8; --full: 1,8,32)")
    p.add_argument("--backends", default=",".join(ALL_BACKENDS),
                   help="comma list of numpy, torch-cpu, cupy, torch-cuda (unavailable ones are skipped with the "
                        "reason); for whole models also numpy-nonumba (TINYVIT_NUMBA=0) and numpy-reference "
                        "(TINYVIT_FUSED=0)")
    p.add_argument("--dtype", default="float32", help="float32 (default) or float64")
    p.add_argument("--repeats", type=int, help="timed calls per measurement (default 3; --full 5)")
    p.add_argument("--threads", type=int, help="BLAS and PyTorch threads (default: NumPy's BLAS count for both)")
    p.add_argument("--sweep", action="store_true", help="also time a training step against the token count")
    p.add_argument("--sizes", help="image sizes of the token sweep, comma list (default 64,128,224,320; "
                   "--full adds 448,640)")
    p.add_argument("--attention", action="store_true",
                   help="cheaper attention: a ViT-Ti/16 training step with plain, flash and windowed attention at "
                        "--sizes (default 224,448,640) and --batch (default 8): time and peak memory, same run")
    p.add_argument("--windows", help="window sizes M for --attention (comma list; used where M divides the grid; "
                   "default 7,8)")
    p.add_argument("--fewer", action="store_true",
                   help="fewer tokens and heads: ToMe at several r, half the heads pruned, PatchDropout 0.5, against "
                        "the plain model and PyTorch, inference and training step (ViT-Ti/S/B at 224 or --models)")
    p.add_argument("--tome-r", help="with --fewer: comma list of ToMe r (default: 0, a quarter, half, 13, the largest)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-jit", action="store_true", help="skip timing the first call of the numba loops "
                   "(two fresh processes: empty cache, then cached)")
    p.add_argument("--json", help="write all results and the machine to this JSON file")
    p.add_argument("--png", help="draw the token sweep to this PNG file")
    p.set_defaults(func=run_bench)
