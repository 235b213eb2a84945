"""Chapter 9: the workflow. Train on the digits, predict, look at the attention, score, export, reload.

What a trained model needs besides its weights, and where tinyvit keeps it: the checkpoint's
safetensors metadata holds the whole ``ViTConfig`` (GELU form, pooling, eps, image size,
channels, ...), the class names and the preprocessing it was trained with (8x8, one grey
channel, the training set's mean/std). So every step below takes the file and nothing else,
exactly as the commands do::

    tinyvit train
    tinyvit predict examples/data/digits/7/0017.png --weights runs/train/checkpoint.safetensors
    tinyvit attention examples/data/digits/3/0023.png --weights runs/train/checkpoint.safetensors -o att.png
    tinyvit eval --weights runs/train/checkpoint.safetensors
    tinyvit export --weights runs/train/checkpoint.safetensors -o digits.safetensors

The chapter checks its own numbers: the reloaded model equals the trained one bit for bit,
``eval`` recomputes the accuracy training printed, the export reloads exactly, and a model
read with the wrong preprocessing (3 channels, ImageNet statistics) is refused or differs.

Run: ``python3 examples/09_workflow.py`` (``--quick``: a smaller, shorter run).
Picture: ``docs/images/09_workflow.png``.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import _tour
import numpy as np

from tinyvit import export_pretrained, load_pretrained
from tinyvit.pretrained.predict import attention_rollout, top_k
from tinyvit.pretrained.weights import open_model
from tinyvit.training.checkpoint import load_arrays_and_metadata
from tinyvit.training.evaluate import accuracy, load_eval_data
from tinyvit.training.train import TrainConfig, train

DIGITS = os.path.join(_tour.HERE, "data", "digits")


def main() -> int:
    args = _tour.parse_args(__doc__)
    failures = []

    def check(ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    work = tempfile.mkdtemp(prefix="tinyvit_09_")
    _tour.banner("1. train (tinyvit train)")
    cfg = TrainConfig(out=os.path.join(work, "run"), epochs=3 if args.quick else 20,
                      **(dict(dim=32, mlp_dim=64, depth=2, heads=2) if args.quick else {}))
    summary = train(cfg, progress=False)
    trained = summary["model"]
    ckpt = summary["checkpoint"]
    print(f"  {summary['steps']} steps, test accuracy {summary['test_acc']:.4f} on {summary['test_images']} images")
    _, meta = load_arrays_and_metadata(ckpt)
    print(f"  {os.path.basename(ckpt)} metadata keys: {sorted(meta)}")
    print(f"  model_config: gelu={json.loads(meta['model_config'])['gelu']}, "
          f"pool={json.loads(meta['model_config'])['pool']}, channels={json.loads(meta['model_config'])['channels']}")
    print(f"  preprocessing: {json.loads(meta['preprocessing'])}")

    _tour.banner("2. reload the checkpoint: load_pretrained(path), no other argument")
    loaded = open_model(ckpt)
    model = loaded.model
    check(model.config == trained.config, "the config is the trained one (tanh GELU, mean pooling, 1 channel)")
    check(all(np.array_equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items()),
          "every weight equals the trained model's, bit for bit")
    print(f"  labels {model.labels}; preprocessing: {model.preprocessing.describe()}")

    _tour.banner("3. predict (tinyvit predict): each shipped digit, preprocessed as trained")
    files = sorted(os.path.join(DIGITS, d, f) for d in sorted(os.listdir(DIGITS)) for f in os.listdir(
        os.path.join(DIGITS, d)))
    rows = []
    for path in files:
        pre = model.preprocessing(path)  # (1, 8, 8): grey, 8x8, (x - mean) / std
        x = pre.pixels[None]  # (1, 1, 8, 8)
        logits = model.forward(x)  # (1, 10)
        index, prob = top_k(logits[0], 1)
        rows.append((path, pre, int(index[0]), float(prob[0])))
    print(f"  one image: {tuple(x.shape)} -> logits {tuple(logits.shape)}")
    right = sum(model.labels[i] == os.path.basename(os.path.dirname(p)) for p, _, i, _ in rows)
    print(f"  {right} of {len(rows)} shipped digits predicted right")
    check(right >= (len(rows) * 0.6 if args.quick else len(rows) * 0.9), "most shipped digits predicted right")
    from tinyvit.pretrained.preprocess import Preprocessing

    wrong = Preprocessing.recipe("tutorial", (8, 8), 3)(files[0]).pixels[None]  # (1, 3, 8, 8): ImageNet's recipe
    try:
        model.forward(wrong)
        check(False, "3-channel ImageNet preprocessing is refused by a 1-channel model")
    except ValueError as exc:
        check("channels" in str(exc), f"3-channel ImageNet preprocessing is refused ({exc})")

    _tour.banner("4. attention (tinyvit attention): rollout over the blocks")
    path, pre, index, prob = rows[6]
    model.forward(pre.pixels[None])
    maps = model.attention_maps()  # depth x (1, NH, N, N)
    rollout = attention_rollout(maps)  # (1, N, N)
    c = model.config
    grid_map = rollout[0, 0, c.num_prefix_tokens:].reshape(c.grid)  # (gh, gw)
    print(f"  {len(maps)} maps of {tuple(maps[0].shape)} -> rollout {tuple(rollout.shape)} -> class token over the "
          f"{c.grid[0]}x{c.grid[1]} patches {np.array2string(grid_map, precision=3).replace(chr(10), '')}")
    check(abs(float(rollout[0].sum(-1).mean()) - 1.0) < 1e-4, "rollout rows sum to 1")

    _tour.banner("5. eval (tinyvit eval): the test split the file was trained with, rebuilt")
    x_test, y_test, what = load_eval_data(loaded)
    correct, count = accuracy(model, x_test, y_test)
    print(f"  {what}: {correct} of {count} = {correct / count:.4f}")
    check(correct / count == summary["test_acc"], "eval recomputes training's test accuracy exactly")

    _tour.banner("6. export (tinyvit export) and reload")
    out = os.path.join(work, "digits.safetensors")
    export_pretrained(model, out)  # layout="tinyvit": timm's keys + the config, labels, preprocessing
    back = load_pretrained(out)
    probe = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)  # (4, 1, 8, 8)
    check(np.array_equal(back.forward(probe), trained.forward(probe)), "the export reloads to the same logits")
    check(back.labels == trained.labels and back.preprocessing == trained.preprocessing,
          "labels and preprocessing travel with it")
    try:
        export_pretrained(model, os.path.join(work, "tv.safetensors"), layout="torchvision")
        check(False, "torchvision's layout refuses what torchvision cannot run")
    except ValueError as exc:
        check("mean pooling" in str(exc), f"torchvision's layout refuses: {str(exc)[:90]}...")

    _tour.banner("picture")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 8, figsize=(12, 5.4))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (path, pre, i, p) in zip(axes.ravel(), rows):
        truth = os.path.basename(os.path.dirname(path))
        ax.imshow(np.asarray(pre.image), cmap="gray")
        ax.set_title(f"{model.labels[i]} ({p:.2f})", fontsize=9, color="black" if model.labels[i] == truth else "red")
    ax_img, ax_roll = axes[2, 5], axes[2, 6]
    ax_img.imshow(np.asarray(rows[6][1].image), cmap="gray")
    ax_img.set_title("digit", fontsize=9)
    ax_roll.imshow(np.asarray(rows[6][1].image), cmap="gray", extent=(0, 8, 8, 0))
    ax_roll.imshow(grid_map / grid_map.max(), cmap="inferno", alpha=0.6, extent=(0, 8, 8, 0), vmin=0, vmax=1)
    ax_roll.set_title("rollout", fontsize=9)
    axes[2, 7].text(0, 0.5, f"eval: {correct / count:.3f}\non {count} test digits\nexport reloads exactly",
                    fontsize=9, va="center")
    fig.suptitle("tinyvit on the digits: predict (title: label, probability; red = wrong), attention rollout, eval")
    fig.tight_layout()
    _tour.save(fig, args, "09_workflow.png")

    import shutil

    shutil.rmtree(work, ignore_errors=True)  # the run's files were the chapter's scratch
    if failures:
        print(f"\n{len(failures)} check(s) failed: {failures}")
        return 1
    print("\nevery check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
