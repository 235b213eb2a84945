"""Chapter 13: fewer tokens, fewer heads: token merging (ToMe), patch dropout and head pruning.

A ViT's cost grows with its tokens (every block, every layer) and its heads. Three ways to
spend less, each measured here on real 28x28 MNIST digits (``--data mnist5k``: 4x4 patches,
49 patch tokens + the class token) as accuracy against images/s:

- **ToMe** (docs/tome.md): each block merges its ``r`` most similar token pairs, so the blocks
  see 50, 50 - r, 50 - 2r, ... tokens. Switched on in the trained model, no retraining.
- **Patch dropout** (docs/patch_dropout.md): train on a random half of the patches.
- **Head pruning** (docs/head_pruning.md): a gate on each head's output; its gradient ranks
  the heads; the least important go, with and without a short fine-tune.

It checks its numbers as it goes (ToMe r = 0 equals the model; the merge's backward by finite
differences; the pruned model equals the gated one) and draws accuracy against throughput.

Run: ``python3 examples/13_fewer_tokens.py`` (trains a model on mnist5k first, minutes; or
``--checkpoint runs/mnist5k_p4/checkpoint.safetensors`` from ``tinyvit train --data mnist5k
--patch-size 4``); ``--quick`` is the seconds-long form the tests run. ``--json FILE`` writes
every number. The machine the measurements in docs/ ran on was shared (load average ~15 on 2
cores): the images/s are medians of interleaved repeats, and the ratios are what to read.
Picture: ``docs/images/13_fewer_tokens.png``.
"""
from __future__ import annotations

import json
import sys
import time

import _tour
import numpy as np

from tinyvit import VisionTransformer
from tinyvit.layers.tome import tome_match, tome_max_r, tome_merge_backward, tome_merge_forward
from tinyvit.pruning import head_importance, least_important, prune_heads
from tinyvit.training.data import Normalizer, load_dataset, split
from tinyvit.training.train import TrainConfig, evaluate, train


def check(ok: bool, what: str) -> None:
    print(f"  check: {what}: {'ok' if ok else 'FAILED'}")
    if not ok:
        sys.exit(1)


def images_per_s(models: dict, x: np.ndarray, repeats: int) -> dict:
    """Inference images/s of each model on the same batch, timed interleaved: ``{name: (median, min, max)}``."""
    times = {k: [] for k in models}
    for m in models.values():
        m.forward(x, keep_cache=False)  # warm-up
    for _ in range(repeats):
        for k, m in models.items():
            t0 = time.perf_counter()
            m.forward(x, keep_cache=False)
            times[k].append(time.perf_counter() - t0)
    return {k: (len(x) / float(np.median(v)), len(x) / max(v), len(x) / min(v)) for k, v in times.items()}


def data(quick: bool):
    """mnist5k's fixed split (tinyvit train's), normalised with the training images' statistics:
    ``(train_x, train_y, test_x, test_y)``; ``quick``: 640 training and 200 test digits."""
    train_set, test_set = split(load_dataset("mnist5k"), 0.2, 0)
    norm = Normalizer.fit(train_set.images)  # what tinyvit train --data mnist5k fits, so a checkpoint sees the same
    train_x, train_y, test_x, test_y = norm(train_set.images), train_set.labels, norm(test_set.images), test_set.labels
    if quick:
        pick = np.random.default_rng(0).permutation(len(train_y))[:640]
        train_x, train_y, test_x, test_y = train_x[pick], train_y[pick], test_x[:200], test_y[:200]
    return train_x, train_y, test_x, test_y


def fit(model, train_x, train_y, steps: int, batch: int = 64, lr: float = 2e-4):
    """A short AdamW run on ``model`` in place (no augmentation; dropout, drop path and patch dropout
    as the model says): ``steps`` steps of ``batch``; returns training images/s."""
    from tinyvit.layers.loss import softmax_cross_entropy
    from tinyvit.training.optim import build_optimizer

    opt = build_optimizer("adamw", lr, 0.05)
    order = np.random.default_rng(1).permutation(len(train_y))
    t0 = time.perf_counter()
    for s in range(steps):
        idx = np.take(order, np.arange(s * batch, (s + 1) * batch), mode="wrap")
        x = model.backend.asarray(np.ascontiguousarray(train_x[idx]), dtype=model.dtype)
        _, d = softmax_cross_entropy(model.forward(x, train=True), model.backend.asarray(train_y[idx]), 0.1)
        model.backward(d)
        opt.step(model.params, model.grads, lr)
    return steps * batch / (time.perf_counter() - t0)


def fine_tune(model, train_x, train_y, steps: int):
    """A copy of ``model`` after ``steps`` AdamW steps at a small learning rate."""
    m = VisionTransformer.from_config(model.config, dtype=model.dtype)
    m.load_state_dict(model.state_dict())
    fit(m, train_x, train_y, steps)
    return m


QUICK_MODEL = dict(image_size=28, patch_size=4, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64, channels=1,
                   pool="mean", gelu="tanh")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=_tour.DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--checkpoint", help="a tinyvit train --data mnist5k checkpoint to measure (else: train one)")
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs of the model when no --checkpoint "
                                                                "(default 30, tinyvit train's recipe)")
    parser.add_argument("--drop-epochs", type=int, default=5, help="epochs of each patch dropout run (default 5)")
    args = parser.parse_args()
    import os
    os.makedirs(args.out, exist_ok=True)
    quick = args.quick
    epochs = args.epochs
    recipe = dict(epochs=epochs, warmup_epochs=min(3.0, epochs / 2), patch_size=4)
    results = {"quick": quick}

    _tour.banner("1. the data and the model")
    train_x, train_y, test_x, test_y = data(quick)
    t0 = time.perf_counter()
    if quick:
        model = VisionTransformer(**QUICK_MODEL, dtype="float32")
        fit(model, train_x, train_y, steps=30, lr=2e-3)
    elif args.checkpoint:
        from tinyvit.training.train import load_model
        model = load_model(args.checkpoint)
    else:
        model = train(TrainConfig(data="mnist5k", out=f"{args.out}/_13_train", **recipe), progress=False,
                      overwrite=True)["model"]
    seconds = time.perf_counter() - t0
    c = model.config
    print(f"mnist5k: train {train_x.shape}, test {test_x.shape}; patch {c.patch_size} -> tokens (B, {c.num_tokens}, "
          f"{c.dim}); {c.depth} blocks x {c.heads} heads; {'loaded' if args.checkpoint else 'trained'} in "
          f"{seconds:.0f} s")
    base_acc = evaluate(model, test_x, test_y)
    print(f"test accuracy {base_acc * 100:.2f}% on {len(test_y)} digits")
    results["model"] = {"config": c.to_dict(), "test_acc": base_acc, "seconds": seconds,
                        "checkpoint": args.checkpoint}
    _tour.banner("2. ToMe: merge r tokens per block, no retraining")
    rng = np.random.default_rng(0)
    metric, x = rng.standard_normal((2, 9, 4)), rng.standard_normal((2, 9, 3))
    match = tome_match(metric, 3, num_prefix=1)
    merged, cache = tome_merge_forward(x, None, match)
    print(f"merge of (2, 9, 3) tokens with r = 3 -> {merged.shape}; sizes {cache.size_out[0, :, 0].tolist()}")
    dout = rng.standard_normal(merged.shape)
    dx = tome_merge_backward(dout, cache)
    fd = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        keep = x[i]
        x[i] = keep + 1e-6
        plus = np.sum(tome_merge_forward(x, None, match)[0] * dout)
        x[i] = keep - 1e-6
        minus = np.sum(tome_merge_forward(x, None, match)[0] * dout)
        x[i] = keep
        fd[i] = (plus - minus) / 2e-6
    check(np.abs(dx - fd).max() < 1e-8, f"merge backward vs finite differences ({np.abs(dx - fd).max():.1e})")
    largest = tome_max_r(c.num_tokens, c.num_prefix_tokens, c.depth)
    rs = sorted({0, 1, 2, largest // 2, largest} if quick else range(largest + 1))
    batch = test_x[:200]
    xb = model.backend.asarray(np.ascontiguousarray(batch), dtype=model.dtype)
    plain_logits = model.forward(xb, keep_cache=False)
    variants = {}
    for r in rs:
        m = VisionTransformer.from_config({**c.to_dict(), "tome_r": r}, dtype=model.dtype)
        m.load_state_dict(model.state_dict())
        variants[r] = m
    check(np.array_equal(variants[0].forward(xb, keep_cache=False), plain_logits), "ToMe r = 0 gives the model's "
                                                                                   "logits bit for bit")
    speed = images_per_s(variants, xb, 3 if quick else 7)
    tome_rows = []
    print("  r | tokens in the blocks     | test acc | images/s (median, min-max) | vs r = 0")
    for r, m in variants.items():
        acc = evaluate(m, test_x, test_y)
        med, lo, hi = speed[r]
        counts = m.config.token_counts()
        tome_rows.append({"r": r, "tokens": counts, "test_acc": acc, "images_per_s": med, "min": lo, "max": hi,
                          "vs_r0": med / speed[0][0]})
        print(f"{r:3d} | {str(counts):24s} | {acc * 100:7.2f}% | {med:8.0f} ({lo:.0f}-{hi:.0f}) | "
              f"{med / speed[0][0]:.2f}x")
    results["tome"] = tome_rows

    _tour.banner("3. head importance and pruning")
    batches = [(train_x[i:i + 100], train_y[i:i + 100]) for i in range(0, 400 if quick else 2000, 100)]
    scores = head_importance(model, batches)
    for i, s in enumerate(scores):
        print(f"block {i}: importance {np.round(s, 3).tolist()}")
    total = sum(len(s) for s in scores)
    levels = sorted(set(range(0, total - c.depth + 1, 1 if quick else 2)) | {total - c.depth})
    probe = VisionTransformer.from_config(c.to_dict(), dtype="float64")
    probe.load_state_dict(model.state_dict())
    plan = least_important(scores, min(3, total - c.depth))
    small = prune_heads(probe, plan)
    probe.set_head_gates({i: [0.0 if h in plan.get(i, []) else 1.0 for h in range(c.heads)] for i in range(c.depth)})
    x64 = np.ascontiguousarray(batch[:16], dtype=np.float64)
    err = float(np.abs(small.forward(x64) - probe.forward(x64)).max())
    check(err <= 1e-12, f"pruned model {small.config.block_heads} equals the gated one (float64, max diff {err:.1e})")
    prune_rows = []
    pruned_models = {}
    for n in levels:
        pruned_models[n] = prune_heads(model, least_important(scores, n)) if n else model
    speed = images_per_s(pruned_models, xb, 3 if quick else 5)
    print(" removed | heads per block | acc, no fine-tune | acc, fine-tuned | images/s | vs all heads")
    for n, m in pruned_models.items():
        acc = evaluate(m, test_x, test_y)
        tuned = fine_tune(m, train_x, train_y, steps=8 if quick else 31) if n else m
        acc_ft = evaluate(tuned, test_x, test_y)
        med, lo, hi = speed[n]
        heads = m.config.block_heads or (c.heads,) * c.depth
        prune_rows.append({"removed": n, "block_heads": list(heads), "test_acc": acc, "test_acc_finetuned": acc_ft,
                           "images_per_s": med, "min": lo, "max": hi, "vs_all": med / speed[0][0]})
        print(f"{n:8d} | {str(tuple(heads)):15s} | {acc * 100:16.2f}% | {acc_ft * 100:14.2f}% | {med:8.0f} | "
              f"{med / speed[0][0]:.2f}x")
    results["pruning"] = prune_rows

    _tour.banner("4. patch dropout: train on half of the patches")
    drop_rows = []
    for rate in (0.0, 0.5):
        t0 = time.perf_counter()
        if quick:
            m = VisionTransformer(**QUICK_MODEL, patch_drop_rate=rate, dtype="float32")
            rate_s = fit(m, train_x, train_y, steps=20, lr=2e-3)
            acc = evaluate(m, test_x, test_y)
        else:
            s = train(TrainConfig(data="mnist5k", out=f"{args.out}/_13_drop_{rate}", patch_drop_rate=rate,
                                  **{**recipe, "epochs": args.drop_epochs,
                                     "warmup_epochs": min(3.0, args.drop_epochs / 2)}), progress=False,
                      overwrite=True)
            rate_s, acc, m = s["images_per_s"], s["test_acc"], s["model"]
        drop_rows.append({"patch_drop_rate": rate, "test_acc": acc, "train_images_per_s": rate_s,
                          "seconds": time.perf_counter() - t0, "epochs": None if quick else args.drop_epochs})
        kept = 1 + max(1, int(m.config.num_patches * (1 - rate)))
        print(f"patch_drop_rate {rate}: tokens in training (B, {kept}, {m.config.dim}); "
              f"test accuracy {acc * 100:.2f}%, {rate_s:.0f} training images/s")
    results["patch_dropout"] = drop_rows

    draw(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")


def fine_tune(model, train_x, train_y, steps: int, batch: int = 64, lr: float = 2e-4):
    """A short AdamW fine-tune of a copy of ``model`` (no augmentation): ``steps`` steps of ``batch``."""
    from tinyvit.layers.loss import softmax_cross_entropy
    from tinyvit.training.optim import build_optimizer

    m = VisionTransformer.from_config(model.config, dtype=model.dtype)
    m.load_state_dict(model.state_dict())
    opt = build_optimizer("adamw", lr, 0.05)
    order = np.random.default_rng(1).permutation(len(train_y))
    for s in range(steps):
        idx = order[(s * batch) % len(order):][:batch]
        x = m.backend.asarray(np.ascontiguousarray(train_x[idx]), dtype=m.dtype)
        _, d = softmax_cross_entropy(m.forward(x, train=True), m.backend.asarray(train_y[idx]), 0.1)
        m.backward(d)
        opt.step(m.params, m.grads, lr)
    return m


def draw(results: dict, args) -> None:
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    t = results["tome"]
    a.plot([r["images_per_s"] for r in t], [r["test_acc"] * 100 for r in t], "o-")
    for r in t:
        a.annotate(f"r={r['r']}", (r["images_per_s"], r["test_acc"] * 100), fontsize=7, xytext=(3, 3),
                   textcoords="offset points")
    a.set_xlabel("inference images/s (median)")
    a.set_ylabel("test accuracy (%)")
    a.set_title("ToMe on the trained model (no retraining)")
    p = results["pruning"]
    b.plot([r["removed"] for r in p], [r["test_acc"] * 100 for r in p], "o-", label="pruned")
    b.plot([r["removed"] for r in p], [r["test_acc_finetuned"] * 100 for r in p], "s-", label="pruned + fine-tune")
    b2 = b.twinx()
    b2.plot([r["removed"] for r in p], [r["vs_all"] for r in p], "k:", label="speed vs all heads")
    b2.set_ylabel("inference speed vs all heads")
    b.set_xlabel("heads removed (least important first)")
    b.set_ylabel("test accuracy (%)")
    b.set_title("head pruning")
    b.legend(loc="lower left", fontsize=8)
    d = results["patch_dropout"]
    labels = [f"rate {r['patch_drop_rate']}" for r in d]
    c.bar(labels, [r["train_images_per_s"] for r in d], color=["C0", "C1"])
    for i, r in enumerate(d):
        c.text(i, r["train_images_per_s"], f"{r['test_acc'] * 100:.1f}%", ha="center", va="bottom")
    c.set_ylabel("training images/s (label: test accuracy)")
    c.set_title("patch dropout" + (f", {d[0]['epochs']} epochs each" if d[0]["epochs"] else " (20 steps)"))
    fig.suptitle("fewer tokens, fewer heads on mnist5k" + (" (--quick)" if results["quick"] else ""))
    fig.tight_layout()
    _tour.save(fig, args, "13_fewer_tokens.png")


if __name__ == "__main__":
    main()
