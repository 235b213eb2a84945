"""Chapter 7: a ViT against a small CNN on the digits, measured rather than asserted.

The tutorial's section 6 has a comparison table (CNN: fewer parameters, good on small data,
O(n) in pixels; ViT: more parameters, needs large data, O(n^2) in patches) and no numbers.
This chapter trains both on the bundled digits (1,797 images of 8x8, a small data set) with
the same optimiser and schedule and prints the table with numbers: parameters, forward
multiply-adds (MACs) per image, test accuracy, training time.

The CNN is built from tinyvit's own layers where it can be:

- a 3x3 convolution, padding 1, is "shifted copies + a linear layer": stack the 9 shifted
  views of the padded image into ``(B, H, W, C*9)`` columns (im2col) and apply
  ``linear_forward`` with the conv weight reshaped ``(C_out, C*9)``; its backward is the
  linear backward, then each of the 9 column blocks added back at its shift (col2im).
  Written here, with its finite-difference and PyTorch checks in tests/test_examples.py;
- a stride-2 downsampling convolution with a 2x2 kernel is exactly tinyvit's
  ``patch_embed_forward`` with P = 2 (chapter 1);
- ReLU, written here: ``out = max(x, 0)``, ``dx = dout * (x > 0)``;
- the 4x4 map of features is flattened (a reshape) into the classifier, ``linear_forward``.

After training, the ViT's attention is drawn on a few test digits: the last block's
class-token attention per head, and the attention rollout over both blocks
(``tinyvit.pretrained.predict.attention_rollout``, Abnar & Zuidema 2020), read from
``VisionTransformer.attention_maps()``.

Run: ``python3 examples/07_vit_vs_cnn.py`` (about half a minute; ``--quick`` a few seconds).
Pictures: ``docs/images/07_vit_vs_cnn.png``, ``docs/images/07_vit_attention.png``.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import _tour
import numpy as np

from tinyvit import VisionTransformer, softmax_cross_entropy
from tinyvit.backend import array_module
from tinyvit.benchmark.flops import forward_macs
from tinyvit.layers.linear import LinearCache, linear_backward, linear_forward
from tinyvit.training.optim import AdamW, warmup_cosine
from tinyvit.layers.patch_embed import patch_embed_backward, patch_embed_forward
from tinyvit.pretrained.predict import attention_rollout, cls_attention


# ---------------------------------------------------------------- the two new ops
class Conv3x3Cache(NamedTuple):
    linear: LinearCache  # x: the columns (B, H, W, C*9), w: (C_out, C*9)
    x_shape: tuple  # (B, C, H, W)
    w_shape: tuple  # (C_out, C, 3, 3)


def conv3x3_forward(x, w, b):
    """3x3 convolution, stride 1, zero padding 1 (``F.conv2d(x, w, b, padding=1)``).

    ``x: (B, C, H, W), w: (C_out, C, 3, 3), b: (C_out,) -> out: (B, C_out, H, W)``;
    cache: the columns ``(B, H, W, C*9)`` and ``w``.
    """
    xp = array_module(x)
    batch, channels, height, width = x.shape
    c_out = w.shape[0]
    padded = xp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))  # (B, C, H+2, W+2)
    shifts = [padded[:, :, i : i + height, j : j + width] for i in range(3) for j in range(3)]  # 9 x (B, C, H, W)
    cols = xp.stack(shifts, axis=2)  # (B, C, 9, H, W)
    cols = cols.transpose(0, 3, 4, 1, 2).reshape(batch, height, width, channels * 9)  # (B, H, W, C*9), (c kh kw)
    out, linear_cache = linear_forward(cols, w.reshape(c_out, channels * 9), b)  # (B, H, W, C*9) @ (C*9, C_out)
    out = out.transpose(0, 3, 1, 2)  # (B, H, W, C_out) -> (B, C_out, H, W)
    return out, Conv3x3Cache(linear_cache, tuple(x.shape), tuple(w.shape))


def conv3x3_backward(dout, cache: Conv3x3Cache):
    """``dout: (B, C_out, H, W) -> dx: (B, C, H, W), dw: (C_out, C, 3, 3), db: (C_out,)``.

    The forward copied every pixel into up to 9 column slots; the backward adds the 9
    slots' gradients back to the pixel they came from.
    """
    xp = array_module(dout)
    batch, channels, height, width = cache.x_shape
    dcols, dw_2d, db = linear_backward(dout.transpose(0, 2, 3, 1), cache.linear)  # (B, H, W, C*9)
    dcols = dcols.reshape(batch, height, width, channels, 9).transpose(0, 3, 4, 1, 2)  # (B, C, 9, H, W)
    dpadded = xp.zeros((batch, channels, height + 2, width + 2), dtype=dout.dtype)  # (B, C, H+2, W+2)
    for k in range(9):
        i, j = divmod(k, 3)
        dpadded[:, :, i : i + height, j : j + width] += dcols[:, :, k]
    return dpadded[:, :, 1:-1, 1:-1], dw_2d.reshape(cache.w_shape), db  # (B, C, H, W)


def relu_forward(x):
    """``x: (...) -> out: (...)``; cache: the mask ``x > 0``."""
    mask = x > 0
    return x * mask, mask


def relu_backward(dout, mask):
    """``dout: (...) -> dx: (...)``: the gradient passes where the input was positive."""
    return dout * mask


# ---------------------------------------------------------------- the small CNN
def cnn_init(channels: int, width: int, num_classes: int, seed: int) -> dict:
    """PyTorch's default init (uniform in +-1/sqrt(fan_in)) for conv1 (3x3), conv2 (2x2, stride 2), head."""
    rng = np.random.default_rng(seed)

    def uniform(shape, fan_in):
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    return {
        "conv1.weight": uniform((width, channels, 3, 3), channels * 9), "conv1.bias": uniform((width,), channels * 9),
        "conv2.weight": uniform((2 * width, width, 2, 2), width * 4), "conv2.bias": uniform((2 * width,), width * 4),
        "head.weight": uniform((num_classes, 16 * 2 * width), 16 * 2 * width),
        "head.bias": uniform((num_classes,), 16 * 2 * width),
    }


def cnn_forward(p: dict, x):
    """``x: (B, C, H, W) -> logits (B, K)``; the caches, in order, for :func:`cnn_backward`."""
    h, c1 = conv3x3_forward(x, p["conv1.weight"], p["conv1.bias"])  # (B, W1, H, W)
    h, r1 = relu_forward(h)
    h, c2 = patch_embed_forward(h, p["conv2.weight"], p["conv2.bias"])  # (B, W1, H, W) -> (B, H*W/4, W2)
    h, r2 = relu_forward(h)
    flat_shape = h.shape
    h = h.reshape(h.shape[0], -1)  # (B, H*W/4, W2) -> (B, H*W/4 * W2): every position keeps its own weights
    logits, head = linear_forward(h, p["head.weight"], p["head.bias"])  # (B, K)
    return logits, (c1, r1, c2, r2, flat_shape, head)


def cnn_backward(dlogits, caches) -> dict:
    """The forward read bottom-up: ``dlogits (B, K) -> {key: gradient}``."""
    c1, r1, c2, r2, flat_shape, head = caches
    g = {}
    dh, g["head.weight"], g["head.bias"] = linear_backward(dlogits, head)  # (B, H*W/4 * W2)
    dh = dh.reshape(flat_shape)  # (B, H*W/4, W2)
    dh = relu_backward(dh, r2)
    dh, g["conv2.weight"], g["conv2.bias"] = patch_embed_backward(dh, c2)  # (B, W1, H, W)
    dh = relu_backward(dh, r1)
    _, g["conv1.weight"], g["conv1.bias"] = conv3x3_backward(dh, c1)  # dx of the image is not needed
    return g


def cnn_macs(channels: int, size: int, width: int, num_classes: int) -> int:
    """Forward multiply-adds per image of the matrix products (as tinyvit.benchmark.flops counts a ViT's)."""
    conv1 = size * size * width * channels * 9
    conv2 = (size // 2) ** 2 * (2 * width) * width * 4
    return conv1 + conv2 + (size // 2) ** 2 * 2 * width * num_classes


# ---------------------------------------------------------------- one training loop for both
def train(name, forward, backward, params, data, epochs, batch_size, lr, seed):
    """AdamW (tinyvit.training.optim) with warm-up + cosine; -> (test accuracy per epoch, seconds)."""
    x_train, y_train, x_test, y_test = data
    steps_per_epoch = len(y_train) // batch_size
    total = epochs * steps_per_epoch
    opt = AdamW(lr=lr, weight_decay=0.05)
    rng = np.random.default_rng(seed)
    accuracies, step = [], 0
    start = time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(len(y_train))
        for k in range(steps_per_epoch):
            idx = order[k * batch_size : (k + 1) * batch_size]
            logits = forward(x_train[idx])  # (B, K)
            loss, dlogits = softmax_cross_entropy(logits, y_train[idx])
            grads = backward(dlogits)
            opt.step(params, grads, lr=warmup_cosine(step, total, steps_per_epoch, lr))
            step += 1
        accuracies.append(float((forward(x_test).argmax(axis=1) == y_test).mean()))
    seconds = time.perf_counter() - start
    print(f"{name}: {epochs} epochs x {steps_per_epoch} steps, last loss {float(loss):.3f}, "
          f"test accuracy {accuracies[-1]:.3f}, {seconds:.1f} s")
    return accuracies, seconds


def main() -> None:
    args = _tour.parse_args(__doc__)
    images, labels = _tour.digits()  # (1797, 1, 8, 8), (1797,)
    data = _tour.split(images, labels)
    x_train, y_train, x_test, y_test = data
    epochs = 4 if args.quick else 30
    print(f"train {x_train.shape}, test {x_test.shape}; {epochs} epochs each, batch 64, AdamW lr 3e-3, wd 0.05")

    _tour.banner("the small CNN, from tinyvit's layers and a 3x3 conv written here")
    width = 16
    cnn = cnn_init(channels=1, width=width, num_classes=10, seed=0)
    caches = {}

    def cnn_fwd(x):
        logits, caches["last"] = cnn_forward(cnn, x)
        return logits

    x = x_train[:64]  # (B, C, H, W) = (64, 1, 8, 8): the CNN's layers one by one, for their shapes
    h1, _ = conv3x3_forward(x, cnn["conv1.weight"], cnn["conv1.bias"])  # (64, W1, 8, 8)
    h2, _ = patch_embed_forward(relu_forward(h1)[0], cnn["conv2.weight"], cnn["conv2.bias"])  # (64, 16, W2)
    logits, _ = cnn_forward(cnn, x)  # (64, K)
    print(f"x {x.shape} -> conv3x3 {h1.shape} (columns {(64, 8, 8, 9)}) -> ReLU -> 2x2/2 conv = patch_embed(P=2) "
          f"{h2.shape} -> ReLU -> flatten {(64, h2.shape[1] * h2.shape[2])} -> head {logits.shape}")
    cnn_params = sum(v.size for v in cnn.values())
    cnn_acc, cnn_time = train("CNN", cnn_fwd, lambda d: cnn_backward(d, caches["last"]), cnn, data, epochs, 64, 3e-3, 0)

    _tour.banner("the ViT: P = 2 on 8x8 digits -> 16 patches + class token")
    vit_config = dict(image_size=8, patch_size=2, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64, channels=1)
    vit = VisionTransformer(**vit_config, seed=0)
    print(f"x {x_train[:64].shape} -> tokens (64, {vit.config.num_tokens}, 32) -> 2 blocks -> class token (64, 32) "
          f"-> head (64, 10)")
    vit_acc, vit_time = train("ViT", vit.forward, lambda d: (vit.backward(d), vit.grads)[1], vit.params, data,
                              epochs, 64, 3e-3, 0)

    _tour.banner("the tutorial's table, measured (this machine's CPU, NumPy, float32)")
    rows = [
        ("small CNN", cnn_params, cnn_macs(1, 8, width, 10), cnn_acc[-1], cnn_time),
        ("ViT", vit.num_params(), forward_macs(vit.config), vit_acc[-1], vit_time),
    ]
    print(f"{'model':10s} {'parameters':>11s} {'MACs/image':>11s} {'FLOPs/image':>12s} {'test acc':>9s} "
          f"{'train time':>11s}")
    for name, n_params, macs, acc, seconds in rows:
        print(f"{name:10s} {n_params:11,d} {macs:11,d} {2 * macs:12,d} {acc:9.3f} {seconds:10.1f}s")
    print("(forward, per image, matrix products only: a multiply-add is 1 MAC = 2 FLOPs; train time is wall clock)")
    print("Read with care: one seed, one small data set, two small models. The CNN's small shared kernels build in")
    print("locality and translation equivariance (the tutorial's 'strong inductive bias'); the ViT has to learn them")
    print(f"from {len(y_train):,} images, and with fewer parameters and MACs the CNN does better here, as the tutorial")
    print("says of small data. At 8x8 the attention's N^2 = 17^2 term is small; it grows with the square of the")
    print("number of patches (tinyvit.benchmark.flops.attention_share), while a convolution grows with the pixels.")

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    for name, acc in (("small CNN", cnn_acc), ("ViT", vit_acc)):
        ax.plot(range(1, epochs + 1), acc, marker="o", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Digits (train {len(y_train)}, test {len(y_test)}), same AdamW schedule", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1]
    labels_ = ["parameters", "MACs / image", "train seconds"]
    cnn_vals = [rows[0][1], rows[0][2], rows[0][4]]
    vit_vals = [rows[1][1], rows[1][2], rows[1][4]]
    pos = np.arange(3)
    ax.bar(pos, np.array(vit_vals) / np.array(cnn_vals), 0.5)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(pos, labels_)
    ax.set_ylabel("ViT / CNN")
    ax.set_title("Cost of the ViT relative to the CNN", fontsize=10)
    for p_, v in zip(pos, np.array(vit_vals) / np.array(cnn_vals)):
        ax.text(p_, v, f"{v:.1f}x", ha="center", va="bottom", fontsize=9)
    _tour.save(fig, args, "07_vit_vs_cnn.png")

    _tour.banner("where the trained ViT's class token looks")
    show = x_test[:6]  # (6, 1, 8, 8)
    predicted = vit.forward(show).argmax(axis=1)  # (6,)
    maps = vit.attention_maps()  # [(6, NH, N, N)] x depth
    heads = cls_attention(maps[-1], vit.config.num_prefix_tokens, vit.config.grid)  # (6, NH, 4, 4)
    rollout = attention_rollout(maps)[:, 0, 1:].reshape(-1, *vit.config.grid)  # row 0 over the patches: (6, 4, 4)
    print(f"attention maps {[a.shape for a in maps]} -> class token's row, last block, per head {heads.shape}; "
          f"rollout over the blocks {rollout.shape}")
    fig, axes = plt.subplots(2 + heads.shape[1], len(show), figsize=(1.6 * len(show), 1.7 * (2 + heads.shape[1])))
    for j in range(len(show)):
        axes[0, j].imshow(show[j, 0], cmap="gray_r")
        axes[0, j].set_title(f"label {y_test[j]}, pred {predicted[j]}", fontsize=8)
        for h in range(heads.shape[1]):
            axes[1 + h, j].imshow(np.kron(heads[j, h], np.ones((2, 2))), cmap="inferno")
        axes[-1, j].imshow(np.kron(rollout[j], np.ones((2, 2))), cmap="inferno")
    for h in range(heads.shape[1]):
        axes[1 + h, 0].set_ylabel(f"head {h}", fontsize=8)
    axes[0, 0].set_ylabel("digit", fontsize=8)
    axes[-1, 0].set_ylabel("rollout", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Trained ViT: class-token attention over the 4x4 patches (last block), and rollout", fontsize=9)
    _tour.save(fig, args, "07_vit_attention.png")


if __name__ == "__main__":
    main()
