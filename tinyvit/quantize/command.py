"""``tinyvit quantize --weights CKPT --out Q.safetensors``: calibrate, quantise to int8, write, report.

Calibration images: by default the training split the file was trained on (a tinyvit
checkpoint or export knows its data: the images training saw, never the test split),
``--calib-images`` of them in a seeded random order; or ``--calib-data`` (a folder of class
folders, an ``.npz``, or a named data set, read as ``tinyvit eval`` reads them). With ``--eval``
the float and int8 models are both scored on the file's test split (``tinyvit eval``'s default).
"""
from __future__ import annotations

import os
import sys

import numpy as np


def calibration_images(loaded, data=None, count: int = 256, seed: int = 0) -> tuple:
    """``(images (M, C, H, W) normalised host float32, description)`` for :func:`calibrate`."""
    from ..training.data import load_dataset, split
    from ..training.evaluate import _check_array_data, _training_split, load_eval_data
    from ..pretrained.predict import preprocessing_for

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"--calib-images must be an int >= 1, got {count!r}")
    if data is None:
        try:
            source, fraction, split_seed = _training_split(loaded)
        except ValueError:
            raise ValueError(f"{loaded.path}: the file does not say which data it was trained on; pass --calib-data "
                             f"(a folder of class folders, an .npz, or a named data set)") from None
        train_set, _ = split(load_dataset(source), fraction, split_seed)
        images = _check_array_data(train_set.images, loaded.model.config, preprocessing_for(loaded), "calibration")
        what = f"{'the bundled digits' if source is None else source}, training split"
    else:
        images, _, what = load_eval_data(loaded, data)
    order = np.random.default_rng(seed).permutation(len(images))[:count]
    return np.ascontiguousarray(images[np.sort(order)], dtype=np.float32), f"{min(count, len(images))} images of {what}"


def run_quantize(args) -> int:
    from ..pretrained.predict import open_from_args
    from ..training.evaluate import accuracy, load_eval_data
    from .ptq import quantize_model, save_quantized

    if not args.out.endswith((".safetensors", ".npz")):
        raise ValueError(f"--out must end in .safetensors or .npz, got {args.out!r}")
    loaded = open_from_args(args)
    images, what = calibration_images(loaded, args.calib_data, args.calib_images, args.seed)
    q = quantize_model(loaded.model, images, args.method, args.percentile, args.batch_size)
    data = loaded.meta.get("data")
    if data is None and isinstance(loaded.meta.get("train_config"), dict):
        tc = loaded.meta["train_config"]
        data = {"data": tc.get("data"), "test_fraction": tc.get("test_fraction"), "split_seed": tc.get("split_seed")}
    save_quantized(args.out, q, data=data)
    size_in, size_out = os.path.getsize(args.weights), os.path.getsize(args.out)
    floats = sum(int(np.prod(v.shape)) for v in loaded.model.params.values()) * 4
    print(f"calibration: {what} ({args.method}{f' {args.percentile}' if args.method == 'percentile' else ''})",
          file=sys.stderr)
    print(f"wrote {args.out}: {size_out:,} bytes ({len(q.quant)} int8 linear layers); float32 weights are "
          f"{floats:,} bytes ({floats / size_out:.2f}x), the input file {size_in:,} bytes")
    if args.eval:
        x, y, where = load_eval_data(loaded)
        c32, n = accuracy(loaded.model, x, y)
        c8, _ = accuracy(q, x, y)
        print(f"accuracy on {where}: float {100 * c32 / n:.2f}%, int8 {100 * c8 / n:.2f}% "
              f"({100 * (c8 - c32) / n:+.2f} points)")
    return 0


def register(subparsers) -> None:
    from ..pretrained.predict import add_weights_arguments
    from .ptq import METHODS

    p = subparsers.add_parser("quantize", help="INT8 post-training quantisation of a weights file",
                              description="Calibrate on a few batches, quantise every linear layer to int8 "
                                          "(per-channel weights, per-tensor inputs) and write a file that "
                                          "predict / attention / eval / load_pretrained read.")
    add_weights_arguments(p)
    p.add_argument("--out", required=True, help="the int8 file (.safetensors or .npz)")
    p.add_argument("--method", choices=METHODS, default="percentile",
                   help="activation range: minmax = max |x|; percentile = the --percentile-th percentile of |x|")
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--calib-data", default=None,
                   help="calibration images: a folder of class folders, an .npz or a named data set "
                        "(default: the training split the file was trained on)")
    p.add_argument("--calib-images", type=int, default=256, help="how many calibration images (seeded choice)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", action="store_true", help="also score float and int8 on the file's test split")
    p.set_defaults(func=run_quantize)
