"""Measurements for lower precision (issue 14): mixed-precision training runs on the digits,
the cost of low-precision products on NumPy. Writes JSON next to this file; the numbers are
copied into bench/README.md ("Lower precision").

    python3 bench/lower_precision.py train [--seeds 0 1 2] [--epochs 60]   # fp32 / fp16 / bf16 default recipe
    python3 bench/lower_precision.py matmul                               # fp32 BLAS vs NumPy float16 vs emulated
    python3 bench/lower_precision.py ptq CKPT [CKPT ...]                   # int8 accuracy drop, sizes, QAT recovery
    python3 bench/lower_precision.py qat CKPT [--percentiles 99.9 99 95]   # QAT where PTQ clips and loses
    python3 bench/lower_precision.py vits                                 # ViT-Ti/S/B at 224: logit error, size, speed

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

from tinyvit.benchmark.timing import time_calls  # noqa: E402  (the interleaved timer tinyvit bench uses)


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load": os.getloadavg(), "numpy": np.__version__}


def run_train(args) -> None:
    from tinyvit.training.train import TrainConfig, train

    path = os.path.join(HERE, "results_lowp_train.json")
    results = {"machine": machine(), "runs": []}
    if os.path.exists(path):  # add to the runs already measured (other seeds)
        with open(path) as f:
            results["runs"] = [r for r in json.load(f)["runs"] if r["seed"] not in args.seeds]
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
        times = {name: t.times for name, t in time_calls(cases, args.repeats, warmup=0).items()}  # interleaved
        base = np.median(times["fp32 BLAS"])
        for name, ts in times.items():
            med = float(np.median(ts))
            rows.append({"shape": f"({m}, {k}) @ ({k}, {n})", "what": what, "case": name, "median_ms": med * 1e3,
                         "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3, "x_fp32": med / base})
            print(f"{what:22s} {name:36s} {med * 1e3:9.2f} ms  ({min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f})  "
                  f"{med / base:6.1f}x fp32", flush=True)
    with open(os.path.join(HERE, "results_lowp_matmul.json"), "w") as f:
        json.dump({"machine": machine(), "rows": rows}, f, indent=1)


def run_ptq(args) -> None:
    """For each checkpoint: float / int8 (min-max, percentile) accuracy on its test split, PyTorch's
    dynamic int8 on the same weights, file sizes, and a short QAT fine-tune from the worse PTQ."""
    import tempfile

    from tinyvit.pretrained.weights import open_model
    from tinyvit.quantize import calibrate, convert, finetune, prepare_qat, quantize_model, save_quantized
    from tinyvit.quantize.command import calibration_images
    from tinyvit.quantize.torch_anchor import dynamic_int8, logits, torch_module
    from tinyvit.training.data import load_dataset, split
    from tinyvit.training.evaluate import _check_array_data, _training_split, accuracy, load_eval_data
    from tinyvit.pretrained.predict import preprocessing_for

    out = {"machine": machine(), "models": []}
    for path in args.checkpoints:
        loaded = open_model(path)
        m = loaded.model
        x, y, what = load_eval_data(loaded)
        cal, cal_what = calibration_images(loaded, None, args.calib, 0)
        row = {"checkpoint": path, "data": what, "calibration": cal_what, "test_images": len(y)}
        row["float"] = accuracy(m, x, y)[0] / len(y)
        tmp = tempfile.mkdtemp()
        for method in ("minmax", "percentile"):
            q = quantize_model(m, cal, method)
            row[method] = accuracy(q, x, y)[0] / len(y)
            f = os.path.join(tmp, f"{method}.safetensors")
            save_quantized(f, q)
            row["int8_file_bytes"] = os.path.getsize(f)
        row["float32_weight_bytes"] = sum(int(np.prod(v.shape)) for v in m.params.values()) * 4
        from tinyvit.pretrained.weights import export_pretrained
        f32 = os.path.join(tmp, "float.safetensors")
        export_pretrained(m, f32)
        row["float32_file_bytes"] = os.path.getsize(f32)
        tm = torch_module(m)
        for pc in (True, False):
            tq = dynamic_int8(torch_module(m), pc)
            pred = np.concatenate([logits(tq, x[i:i + 256]).argmax(1) for i in range(0, len(y), 256)])
            row[f"torch_dynamic_{'per_channel' if pc else 'per_tensor'}"] = float((pred == y).mean())
        del tm
        # QAT: from the float weights, fake-quantised, a short fine-tune on the training split
        source, fraction, seed = _training_split(loaded)
        train_set, _ = split(load_dataset(source), fraction, seed)
        xt = _check_array_data(train_set.images, m.config, preprocessing_for(loaded), "train")
        yt = train_set.labels
        worse = min(("minmax", "percentile"), key=lambda k: row[k])
        amax = calibrate(m, cal, worse)
        prepare_qat(m, amax)
        row["qat_from"] = worse
        row["qat_before"] = accuracy(convert(m), x, y)[0] / len(y)
        t = time.perf_counter()
        losses = finetune(m, xt, yt, steps=args.qat_steps, lr=args.qat_lr, batch_size=64)
        row["qat_seconds"] = time.perf_counter() - t
        row["qat_steps"], row["qat_lr"] = args.qat_steps, args.qat_lr
        row["qat"] = accuracy(convert(m), x, y)[0] / len(y)
        row["qat_loss_first_last"] = [float(np.mean(losses[:10])), float(np.mean(losses[-10:]))]
        out["models"].append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(HERE, "results_lowp_ptq.json"), "w") as f:
            json.dump(out, f, indent=1)


def run_qat(args) -> None:
    """QAT where PTQ loses: percentile calibrations that clip (99.9, 99.0, 95.0) on a checkpoint,
    PTQ accuracy, then a short fake-quantised fine-tune from those scales and its accuracy."""
    from tinyvit.pretrained.weights import open_model
    from tinyvit.pretrained.predict import preprocessing_for
    from tinyvit.quantize import calibrate, convert, finetune, prepare_qat, quantize_model
    from tinyvit.quantize.command import calibration_images
    from tinyvit.training.data import load_dataset, split
    from tinyvit.training.evaluate import _check_array_data, _training_split, accuracy, load_eval_data

    out = {"machine": machine(), "rows": []}
    for path in args.checkpoints:
        for pct in args.percentiles:
            loaded = open_model(path)
            m = loaded.model
            x, y, _ = load_eval_data(loaded)
            cal, _ = calibration_images(loaded, None, 256, 0)
            source, fraction, seed = _training_split(loaded)
            train_set, _ = split(load_dataset(source), fraction, seed)
            xt = _check_array_data(train_set.images, m.config, preprocessing_for(loaded), "train")
            row = {"checkpoint": path, "percentile": pct, "float": accuracy(m, x, y)[0] / len(y)}
            row["ptq"] = accuracy(quantize_model(m, cal, "percentile", pct), x, y)[0] / len(y)
            prepare_qat(m, calibrate(m, cal, "percentile", pct))
            t = time.perf_counter()
            finetune(m, xt, train_set.labels, steps=args.steps, lr=args.lr, batch_size=64)
            row["qat"], row["qat_steps"], row["qat_lr"] = accuracy(convert(m), x, y)[0] / len(y), args.steps, args.lr
            row["qat_seconds"] = time.perf_counter() - t
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
            with open(os.path.join(HERE, "results_lowp_qat.json"), "w") as f:
                json.dump(out, f, indent=1)


def run_vits(args) -> None:
    """ViT-Ti/S/B/16 at 224 with random (timm-style) initial weights: int8 logit error against
    float, PyTorch's quantize_dynamic on the same weights, file sizes, forward time."""
    import tempfile

    from tinyvit import VisionTransformer, export_pretrained
    from tinyvit.layers.quant import int_matmul
    from tinyvit.quantize import quantize_model, save_quantized
    from tinyvit.quantize.torch_anchor import dynamic_int8, logits, torch_module

    import torch
    torch.set_num_threads(1)
    sizes = {"vit_ti16": (192, 3), "vit_s16": (384, 6), "vit_b16": (768, 12)}
    out = {"machine": machine(), "note": "random initial weights (timm's init), random normal images", "rows": []}
    tmp = tempfile.mkdtemp()
    for name in args.models:
        dim, heads = sizes[name]
        m = VisionTransformer(224, 16, 1000, dim, 12, heads, 4 * dim, seed=0)
        rng = np.random.default_rng(0)
        cal = rng.standard_normal((args.calib, 3, 224, 224)).astype(np.float32)
        x = rng.standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
        row = {"model": name, "batch": args.batch, "calibration_images": args.calib}
        f32 = m.forward(x, keep_cache=False)
        scale = float(np.abs(f32).max())
        for method in ("minmax", "percentile"):
            q = quantize_model(m, cal, method, batch_size=2)
            l8 = q.forward(x, keep_cache=False)
            row[f"{method}_max_err"] = float(np.abs(l8 - f32).max() / scale)
            row[f"{method}_top1_agree"] = float((l8.argmax(1) == f32.argmax(1)).mean())
        tq = dynamic_int8(torch_module(m), True)
        lt = logits(tq, x)
        row["torch_dynamic_max_err"] = float(np.abs(lt - f32).max() / scale)
        row["tinyvit_vs_torch_int8_max_err"] = float(np.abs(lt - l8).max() / scale)
        fq, ff = os.path.join(tmp, name + "_int8.safetensors"), os.path.join(tmp, name + ".safetensors")
        save_quantized(fq, q)
        export_pretrained(m, ff)
        row["int8_file_bytes"], row["float32_file_bytes"] = os.path.getsize(fq), os.path.getsize(ff)
        tf = torch_module(m)
        cases = {"tinyvit float32": lambda: m.forward(x, keep_cache=False),
                 "tinyvit int8": lambda: q.forward(x, keep_cache=False),
                 "torch float32": lambda: logits(tf, x), "torch dynamic int8": lambda: logits(tq, x)}
        times = {k: t.times for k, t in time_calls(cases, args.repeats, warmup=0).items()}
        row["forward_s"] = {k: {"median": float(np.median(v)), "min": min(v), "max": max(v)} for k, v in times.items()}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(HERE, "results_lowp_vits.json"), "w") as f:
            json.dump(out, f, indent=1)
    # what NumPy's lack of integer BLAS costs: ViT-B fc1 at batch 1 (197 x 768 @ 768 x 3072)
    a = np.random.default_rng(1).integers(-127, 128, (197, 768)).astype(np.int8)
    b = np.random.default_rng(2).integers(-127, 128, (768, 3072)).astype(np.int8)
    af, bf = a.astype(np.float32), b.astype(np.float32)
    cases = {"float32 BLAS (float model)": lambda: af @ bf, "int8 -> float64 BLAS (tinyvit)": lambda: int_matmul(a, b),
             "int8 -> int32 matmul (NumPy loop)": lambda: a.astype(np.int32) @ b.astype(np.int32)}
    times = {k: t.times for k, t in time_calls(cases, args.repeats, warmup=0).items()}
    out["int_matmul_vit_b_fc1"] = {k: {"median": float(np.median(v)), "min": min(v), "max": max(v)}
                                   for k, v in times.items()}
    print(json.dumps(out["int_matmul_vit_b_fc1"]), flush=True)
    with open(os.path.join(HERE, "results_lowp_vits.json"), "w") as f:
        json.dump(out, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("--seeds", type=int, nargs="+", default=[0])
    t.add_argument("--epochs", type=int, default=60)
    t.add_argument("--tmp", default="/tmp/tinyvit_lowp")
    m = sub.add_parser("matmul")
    m.add_argument("--repeats", type=int, default=5)
    q = sub.add_parser("ptq")
    q.add_argument("checkpoints", nargs="+")
    q.add_argument("--calib", type=int, default=256)
    q.add_argument("--qat-steps", type=int, default=200)
    q.add_argument("--qat-lr", type=float, default=1e-4)
    a = sub.add_parser("qat")
    a.add_argument("checkpoints", nargs="+")
    a.add_argument("--percentiles", type=float, nargs="+", default=[99.9, 99.0, 95.0])
    a.add_argument("--steps", type=int, default=200)
    a.add_argument("--lr", type=float, default=1e-4)
    v = sub.add_parser("vits")
    v.add_argument("--models", nargs="+", default=["vit_ti16", "vit_s16", "vit_b16"])
    v.add_argument("--batch", type=int, default=2)
    v.add_argument("--calib", type=int, default=4)
    v.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"):
        {"train": run_train, "matmul": run_matmul, "ptq": run_ptq, "qat": run_qat, "vits": run_vits}[args.what](args)


if __name__ == "__main__":
    main()
