"""Measurements for lower precision (issue 14): mixed-precision training runs on the digits,
the cost of low-precision products on NumPy. Writes JSON next to this file; the numbers are
copied into bench/README.md ("Lower precision").

    python3 bench/lower_precision.py train [--seeds 0 1 2] [--epochs 60]   # fp32 / fp16 / bf16 default recipe
    python3 bench/lower_precision.py matmul                               # fp32 BLAS vs NumPy float16 vs emulated

Timing on a shared machine is noisy: every comparison is made in the same run, medians and
spreads reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load": os.getloadavg(), "numpy": np.__version__}


def run_train(args) -> None:
    from tinyvit.training.train import TrainConfig, train

    results = {"machine": machine(), "runs": []}
    path = os.path.join(HERE, "results_lowp_train.json")
    for seed in args.seeds:
        for precision in ("fp32", "fp16", "bf16"):
            cfg = TrainConfig(precision=precision, seed=seed, epochs=args.epochs,
                              out=os.path.join(args.tmp, f"{precision}_{seed}"))
            t = time.perf_counter()
            s = train(cfg, progress=False)
            hist = json.load(open(os.path.join(cfg.out, "history.json")))["history"]
            run = {"precision": precision, "seed": seed, "test_acc": s["test_acc"], "seconds": time.perf_counter() - t,
                   "loss_scale": s["loss_scale"], "loss_scale_skipped": s["loss_scale_skipped"],
                   "skipped_steps": s["skipped_steps"], "step_loss": hist["step_loss"],
                   "test_acc_per_epoch": hist["test_acc"]}
            results["runs"].append(run)
            print(f"seed {seed} {precision}: test {s['test_acc'] * 100:.2f}% in {run['seconds']:.1f} s, "
                  f"loss scale {s['loss_scale']}, skipped {s['loss_scale_skipped']}", flush=True)
            with open(path, "w") as f:
                json.dump(results, f)


def run_matmul(args) -> None:
    import ml_dtypes
    from tinyvit.layers.precision import lowp_matmul

    rows = []
    for (m, k, n, what) in ((1576, 192, 576, "ViT-Ti qkv, batch 8"), (1576, 768, 3072, "ViT-B fc1, batch 8"),
                            (256, 96, 288, "digits qkv, batch 64")):
        rng = np.random.default_rng(0)
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        a16, b16 = a.astype(np.float16), b.astype(np.float16)
        abf, bbf = a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16)
        cases = {"fp32 BLAS": lambda: a @ b, "NumPy float16 @": lambda: a16 @ b16,
                 "ml_dtypes bfloat16 @": lambda: abf @ bbf,
                 "tinyvit fp16 (rounded, fp32 BLAS)": lambda: lowp_matmul(a, b, "fp16"),
                 "tinyvit bf16 (rounded, fp32 BLAS)": lambda: lowp_matmul(a, b, "bf16")}
        times = {name: [] for name in cases}
        for _ in range(args.repeats):  # interleaved
            for name, fn in cases.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        base = np.median(times["fp32 BLAS"])
        for name, ts in times.items():
            med = float(np.median(ts))
            rows.append({"shape": f"({m}, {k}) @ ({k}, {n})", "what": what, "case": name, "median_ms": med * 1e3,
                         "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3, "x_fp32": med / base})
            print(f"{what:22s} {name:36s} {med * 1e3:9.2f} ms  ({min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f})  "
                  f"{med / base:6.1f}x fp32", flush=True)
    with open(os.path.join(HERE, "results_lowp_matmul.json"), "w") as f:
        json.dump({"machine": machine(), "rows": rows}, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("--seeds", type=int, nargs="+", default=[0])
    t.add_argument("--epochs", type=int, default=60)
    t.add_argument("--tmp", default="/tmp/tinyvit_lowp")
    m = sub.add_parser("matmul")
    m.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"):
        {"train": run_train, "matmul": run_matmul}[args.what](args)


if __name__ == "__main__":
    main()
