"""Train at one image size, evaluate at larger ones: 2D RoPE (axial, mixed) against learned
position embeddings resampled bicubic (the measurement of issue 12, section 3).

RoPE-ViT's claim (Heo et al. 2024): RoPE's gain is at resolutions above the training one
(ViT-B, 224 -> 384 px: 82.8 -> 84.4 over absolute positions). Here, on data that fits a CPU:

- ``--data digits``: the bundled 8x8 digits upsampled to the training size (default 16: a 4x4
  grid of 4x4 patches), evaluated at 16, 24, 32, 40 px (grids 4 .. 10);
- ``--data mnist5k``: 5,000 MNIST digits, trained at 28 px (a 7x7 grid), evaluated at 28, 36,
  44, 56 px (grids 7 .. 14).

Each model is trained with ``tinyvit train``'s loop (the same recipe for all three, only
``pos_embed`` differs, several seeds). At a larger size the test images are the same digits
upsampled (bilinear); a RoPE model loads its weights unchanged into a model built at that
size, a learned model gets its ``pos_embed`` resampled bicubic (``tinyvit.resample_pos_embed``,
timm's rule). The same RoPE checkpoints are also read with their patch coordinates scaled
by train grid / eval grid (``+interp``: ``rope_ref_grid``, EVA's and timm's ``ref_feat_shape``
rule), which keeps every angle inside the trained range, as resampling does for the learned table.
Results: a JSON file and a table on stdout (numbers in the README's RoPE section).

    python3 bench/rope_resolution.py --data digits --seeds 0 1 2 --out bench/results_rope_digits.json
    python3 bench/rope_resolution.py --data mnist5k --epochs 15 --seeds 0 --out bench/results_rope_mnist5k.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tinyvit import VisionTransformer, resample_pos_embed  # noqa: E402
from tinyvit.training.checkpoint import load_checkpoint  # noqa: E402
from tinyvit.training.data import NAMED_DATASETS, split  # noqa: E402
from tinyvit.training.train import TrainConfig, evaluate, train  # noqa: E402

KINDS = ("learned", "rope_axial", "rope_mixed")
PRESETS = {  # data -> (train size, eval sizes, epochs)
    "digits": (16, (16, 24, 32, 40), 40),
    "mnist5k": (28, (28, 36, 44, 56), 15),
}


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """``(M, C, H, W) -> (M, C, size, size)``, bilinear, pixel areas aligned (grid_mode)."""
    _, _, h, w = images.shape
    if (h, w) == (size, size):
        return images.copy()
    return ndimage.zoom(images, (1, 1, size / h, size / w), order=1, grid_mode=True, mode="nearest")


def model_at(ckpt, size: int, interpolate: bool = False) -> VisionTransformer:
    """The checkpoint's model rebuilt for ``size x size`` images: RoPE as it is (or, ``interpolate``, with
    its patch coordinates scaled back to the trained range), learned positions resampled bicubic."""
    old = ckpt.meta["model_config"]["image_size"][0] // ckpt.meta["model_config"]["patch_size"]
    cfg = dict(ckpt.meta["model_config"], image_size=[size, size])
    if interpolate:  # coordinates * old/new: the larger grid spans the trained range, more finely
        cfg["rope_ref_grid"] = [old, old]
    model = VisionTransformer.from_config(cfg)
    params = dict(ckpt.params)
    if "pos_embed" in params:
        new = size // cfg["patch_size"]
        params["pos_embed"] = resample_pos_embed(params["pos_embed"], new, (old, old), model.config.num_prefix_tokens)
    model.load_state_dict(params)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=sorted(PRESETS), default="digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--quick", action="store_true", help="1 epoch, 1 seed: checks the script runs")
    args = p.parse_args(argv)
    train_size, eval_sizes, epochs = PRESETS[args.data]
    epochs = 1 if args.quick else (args.epochs or epochs)
    seeds = args.seeds[:1] if args.quick else args.seeds

    dataset = NAMED_DATASETS[args.data]()
    _, test_set = split(dataset, 0.2, 0)  # the split train() makes with its defaults
    results = {"data": args.data, "train_size": train_size, "eval_sizes": list(eval_sizes), "epochs": epochs,
               "model": dict(dim=args.dim, depth=args.depth, heads=args.heads, patch_size=4),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other work",
               "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "train.npz")  # the whole set at the training size; train() splits it
        np.savez(data_path, images=resize(dataset.images, train_size).astype(np.float32), labels=dataset.labels)
        for seed in seeds:
            for kind in args.kinds:
                t0 = time.perf_counter()
                cfg = TrainConfig(data=data_path, epochs=epochs, dim=args.dim, depth=args.depth, heads=args.heads,
                                  mlp_dim=2 * args.dim, pos_embed=kind, seed=seed, warmup_epochs=min(3.0, epochs / 2),
                                  eval_every=epochs, out=os.path.join(tmp, f"{kind}-seed{seed}"))  # a fresh folder
                summary = train(cfg, progress=False)
                ckpt = load_checkpoint(os.path.join(cfg.out, "checkpoint.safetensors"))
                mean, std = (np.asarray(v, np.float32).reshape(1, -1, 1, 1)
                             for v in ckpt.meta["extra"]["normalizer"])
                for interp in ((False, True) if kind.startswith("rope") else (False,)):
                    acc = {}
                    for size in eval_sizes:
                        x = (resize(test_set.images, size).astype(np.float32) - mean) / std
                        acc[size] = evaluate(model_at(ckpt, size, interp), x, test_set.labels)
                    name = kind + ("+interp" if interp else "")
                    run = {"kind": name, "seed": seed, "train_seconds": round(summary["seconds"], 1),
                           "train_test_acc": summary["test_acc"], "acc": {str(k): v for k, v in acc.items()}}
                    results["runs"].append(run)
                    print(f"{name:18s} seed {seed}: " + "  ".join(f"{s}px {a * 100:5.1f}%" for s, a in acc.items())
                          + f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\nmean over seeds {seeds}, test accuracy (%) at each evaluation size (trained at {train_size} px):")
    print("pos_embed          " + "".join(f"{s:>8d}px" for s in eval_sizes))
    summary = {}
    names = [r["kind"] for r in results["runs"]]
    for kind in sorted(set(names), key=names.index):
        rows = [r["acc"] for r in results["runs"] if r["kind"] == kind]
        means = [float(np.mean([r[str(s)] for r in rows])) for s in eval_sizes]
        spreads = [float(np.ptp([r[str(s)] for r in rows])) for s in eval_sizes]
        summary[kind] = {"mean": means, "spread": spreads}
        print(f"{kind:18s} " + "".join(f"{m * 100:8.1f}  " for m in means))
    results["summary"] = summary
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
