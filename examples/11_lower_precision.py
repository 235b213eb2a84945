"""Chapter 11: lower precision. Mixed-precision training (fp16 with a loss scale, bf16), INT8
post-training quantisation, and the straight-through estimator of quantisation-aware training.

The tutorial's optimisation list names mixed precision and INT8. Both change numbers inside the
forward and the backward; here we watch where:

1. the formats: what fp16 and bf16 keep of a float32, and where fp16 underflows;
2. the loss scale: gradients below fp16's 2^-24 vanish; times S = 2^16 they survive, and
   dividing by S in float32 gives them back exactly (S cancels);
3. training the same ViT on the digits in fp32, fp16 (dynamic loss scale) and bf16: the loss
   curves lie on top of each other (measured over the full recipe: bench/README.md);
4. INT8: one layer's weights and inputs with the int8 grid over them (per channel for the
   weights; per tensor, min-max or 99.99th percentile, for the inputs), and the accuracy of the
   quantised model;
5. the straight-through estimator: the staircase of fake quantisation and the gradient QAT uses
   for it, checked against PyTorch's ``fake_quantize_per_tensor_affine`` backward.

Derivation: docs/mixed_precision.md, docs/quantization.md.
Run: ``python3 examples/11_lower_precision.py`` (a minute or two: three training runs; ``--quick`` seconds).
Pictures: ``docs/images/11_precision_curves.png``, ``docs/images/11_int8_grid.png``.
"""
from __future__ import annotations

import tempfile

import _tour
import numpy as np

from tinyvit import VisionTransformer, softmax_cross_entropy
from tinyvit.layers.precision import round_to
from tinyvit.layers.quant import fake_quant_backward, fake_quant_forward, quantize_weight
from tinyvit.quantize import calibrate, quantize_model
from tinyvit.training.amp import DynamicLossScaler
from tinyvit.training.train import TrainConfig, train


def formats() -> None:
    _tour.banner("1. what fp16 and bf16 keep of a float32")
    values = np.array([1.0 + 2.0 ** -9, 3.14159265, 65504.0, 70000.0, 1e-5, 3e-8, 1e-9], dtype=np.float32)
    print(f"{'float32':>14} {'fp16':>14} {'bf16':>14}")
    with np.errstate(over="ignore"):  # 70000 -> inf in fp16 is the point
        fp16 = round_to(values, "fp16")
    for v, h, b in zip(values, fp16, round_to(values, "bf16")):
        print(f"{v:14.8g} {h:14.8g} {b:14.8g}")
    print("fp16: 11 significant bits, largest 65504 (70000 -> inf), smallest subnormal 2^-24 = 6e-8 (1e-9 -> 0)")
    print("bf16:  8 significant bits, float32's exponent range: nothing overflows or underflows here")


def loss_scale() -> None:
    _tour.banner("2. the loss scale: fp16 gradients underflow, S = 2^16 rescues them, and cancels")
    m = VisionTransformer(image_size=8, patch_size=4, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64,
                          channels=1, seed=0)
    x = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
    y = np.arange(16) % 10
    _, dlogits = softmax_cross_entropy(m.forward(x), y)
    tiny = dlogits * np.float32(1e-6)  # a loss 1e-6 times smaller: gradients ~1e-9, below fp16's 6e-8
    print(f"logits {m.forward(x).shape}, dlogits {dlogits.shape}; upstream gradient scaled by 1e-6")
    m.backward(tiny)
    g32 = dict(m.grads)
    m.precision = "fp16"
    m.forward(x)
    m.backward(tiny)
    g16 = dict(m.grads)
    scaler = DynamicLossScaler()
    m.forward(x)
    m.backward(scaler.scale_grad(tiny))  # the backward of S * loss
    g16s, found_inf = scaler.unscale(m.grads)  # divided by S in float32
    key = "blocks.0.mlp.fc1.weight"
    print(f"{key} {g32[key].shape}: zero entries fp32 {np.mean(g32[key] == 0):.0%}, fp16 {np.mean(g16[key] == 0):.0%}, "
          f"fp16 with S = {scaler.scale:g} {np.mean(g16s[key] == 0):.0%} (inf found: {found_inf})")
    err = np.abs(g16s[key] - g32[key]).max() / np.abs(g32[key]).max()
    print(f"fp16 with S vs fp32: max error {err:.1e} of the largest entry (fp16 rounds to 2^-11 = 4.9e-4)")
    if not (np.mean(g16[key] == 0) > 0.5 and err < 2e-2):
        raise SystemExit("the loss scale did not rescue the underflowing gradients")


def training(args, out_dir):
    _tour.banner("3. the same ViT trained in fp32, fp16 (loss scale) and bf16 on the digits")
    epochs = 2 if args.quick else 15
    runs = {}
    for precision in ("fp32", "fp16", "bf16"):
        cfg = TrainConfig(dim=64, depth=2, heads=4, mlp_dim=128, epochs=epochs, warmup_epochs=1, precision=precision,
                          out=f"{out_dir}/{precision}", blas_threads=1)
        s = train(cfg, progress=False)
        import json
        hist = json.load(open(f"{out_dir}/{precision}/history.json"))["history"]
        runs[precision] = (s, hist, cfg)
        extra = (f", loss scale {s['loss_scale']:g}, {s['loss_scale_skipped']} steps skipped"
                 if s["loss_scale"] is not None else "")
        print(f"{precision}: test accuracy {s['test_acc']:.2%} after {s['steps']} steps ({s['seconds']:.1f} s){extra}")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for precision, (s, hist, _) in runs.items():
        loss = np.asarray(hist["step_loss"])
        smooth = np.convolve(loss, np.ones(10) / 10, mode="valid") if len(loss) > 20 else loss
        ax.plot(smooth, lw=1.2, label=f"{precision}: test {s['test_acc']:.1%}")
        ax2.plot(loss - np.asarray(runs["fp32"][1]["step_loss"])[:len(loss)], lw=0.8, label=f"{precision} - fp32")
    ax.set(xlabel="step", ylabel="training loss (10-step mean)", title="mixed precision: the curves coincide")
    ax2.set(xlabel="step", ylabel="loss difference from fp32", title="the difference, step by step")
    ax.legend()
    ax2.legend()
    fig.tight_layout()
    _tour.save(fig, args, "11_precision_curves.png")
    return runs["fp32"][0]["model"], runs["fp32"][2]


def int8(args, model, cfg):
    _tour.banner("4. INT8: the grid over one layer's weights and inputs, and the accuracy")
    from tinyvit.training.data import Normalizer, load_dataset, split
    from tinyvit.training.evaluate import accuracy

    model.precision = "fp32"
    train_set, test_set = split(load_dataset(None), cfg.test_fraction, cfg.split_seed)
    norm = Normalizer.fit(train_set.images)
    cal, x, y = norm(train_set.images[:256]), norm(test_set.images), test_set.labels
    print(f"calibration images {cal.shape}, test images {x.shape}")
    acc = {"float32": accuracy(model, x, y)[0] / len(y)}
    for method in ("minmax", "percentile"):
        acc[method] = accuracy(quantize_model(model, cal, method), x, y)[0] / len(y)
    print("test accuracy: " + ", ".join(f"{k} {v:.2%}" for k, v in acc.items()))
    key = "blocks.1.mlp.fc1.weight"
    w = np.asarray(model.params[key])
    q, s = quantize_weight(w)
    print(f"{key} {w.shape} -> int8 {q.shape} + scales {s.shape}; row scales from {s.min():.2e} to {s.max():.2e}")
    ranges = {m: calibrate(model, cal, m)[key] for m in ("minmax", "percentile")}
    model.forward(cal[:64])
    inputs = np.asarray(model._cache.blocks[1].mlp.fc1.x).ravel()  # fc1's input: the LayerNorm's output
    print(f"fc1's input {model._cache.blocks[1].mlp.fc1.x.shape}: |x| max {ranges['minmax']:.2f}, "
          f"99.99th percentile {ranges['percentile']:.2f}")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    row = int(np.argmax(s))
    ax = axes[0]
    ax.hist(w[row], bins=60, color="C0", alpha=0.8)
    for level in np.arange(-127, 128, 8) * s[row]:
        ax.axvline(level, color="k", lw=0.3, alpha=0.5)
    ax.set(title=f"{key}, row {row}: weights and its int8 grid\n(every 8th of 255 levels; step {s[row]:.1e})",
           xlabel="weight")
    ax = axes[1]
    ax.hist(inputs, bins=120, color="C1", alpha=0.8, log=True)
    for m, c in (("minmax", "r"), ("percentile", "g")):
        ax.axvline(ranges[m], color=c, lw=1.2, label=f"{m}: +-{ranges[m]:.2f}, step {ranges[m] / 127:.1e}")
        ax.axvline(-ranges[m], color=c, lw=1.2)
    ax.set(title="fc1's inputs (64 images) and the per-tensor range", xlabel="activation", ylabel="count (log)")
    ax.legend(fontsize=8)
    ax = axes[2]
    t = np.linspace(-1.6, 1.6, 4001).astype(np.float32)
    scale = np.float32(0.01)  # the grid covers +-127 * 0.01 = +-1.27: outside it, fake_quant clips
    out, cache = fake_quant_forward(t, scale)
    grad = fake_quant_backward(np.ones_like(t), cache)
    ax.plot(t, t, "k:", lw=0.8, label="identity")
    ax.plot(t, out, lw=1.2, label="fake_quant(x), s = 0.01: clipped at +-1.27")
    ax.plot(t, grad - 2.2, lw=1.2, label="its STE gradient (shifted by -2.2): 1 inside, 0 clipped")
    ax.set(title="5. the straight-through estimator", xlabel="x")
    ax.legend(fontsize=8, loc="upper left")
    zoom = ax.inset_axes([0.62, 0.08, 0.35, 0.35])
    near = np.abs(t) < 0.045
    zoom.plot(t[near], out[near], lw=1.0)
    zoom.plot(t[near], t[near], "k:", lw=0.6)
    zoom.set_title("zoom: the staircase, step s", fontsize=7)
    zoom.tick_params(labelsize=6)
    fig.tight_layout()
    _tour.save(fig, args, "11_int8_grid.png")
    return acc


def ste_check() -> None:
    _tour.banner("5. the straight-through estimator against PyTorch's fake-quant backward")
    import torch

    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32) * 2
    out, cache = fake_quant_forward(x, np.float32(0.01))
    dout = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    torch.fake_quantize_per_tensor_affine(tx, 0.01, 0, -127, 127).backward(torch.tensor(dout))
    same = np.array_equal(fake_quant_backward(dout, cache), tx.grad.numpy())
    print(f"x {x.shape}: {np.mean(np.abs(x) > 1.27):.0%} outside the range +-1.27 get zero gradient; "
          f"equal to PyTorch's: {same}")
    if not same:
        raise SystemExit("the STE disagrees with PyTorch")


def main() -> None:
    args = _tour.parse_args(__doc__)
    formats()
    loss_scale()
    with tempfile.TemporaryDirectory() as out_dir:
        model, cfg = training(args, out_dir)
        int8(args, model, cfg)
    ste_check()


if __name__ == "__main__":
    main()
