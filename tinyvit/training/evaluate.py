"""``tinyvit eval``: score a weights file on a data set, without training.

Any file :func:`tinyvit.pretrained.weights.open_model` opens (a ``tinyvit train``
checkpoint, an export, a timm / torchvision / Hugging Face file) is read with its own
config, class names and preprocessing. The data:

- none given: the test split the file was trained with (a checkpoint's training config, or
  the ``data`` record an export of one carries: source, ``test_fraction``, ``split_seed``),
  normalised with the file's mean/std: the number ``tinyvit train`` printed, recomputed;
- a folder of class folders (``DIR/<class>/<image>``): every image goes through the same
  preprocessing as ``tinyvit predict`` (read, converted to the model's channels, resized,
  scaled, normalised), so eval and predict agree image by image;
- a named data set (``tinyvit train --data``'s names): all its images, as arrays;
- an ``.npz`` of ``images`` (already the model's size) and ``labels``, as ``tinyvit train``
  reads it, normalised with the file's mean/std.

Class names are matched by name to the model's labels (a folder ``7`` is the class the
model calls ``"7"``, wherever it sits in its list): the file's labels, a ``--labels`` file,
or ImageNet-1k's names for a 1,000-class model, as ``predict`` names them; with none of these,
class names must be the indices ``0 .. K-1``. A class the model does not know is an error.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from .data import IMAGE_SUFFIXES, NAMED_DATASETS, Normalizer, load_dataset, load_npz, split


def _class_map(classes, labels, num_classes: int, source: str) -> np.ndarray:
    """Data class index -> model output index, by name."""
    if labels is not None:
        index = {name: i for i, name in enumerate(labels)}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise ValueError(f"{source}: classes {unknown[:8]} are not among the model's labels "
                             f"{list(labels)[:12]}{' ...' if len(labels) > 12 else ''}")
        return np.array([index[c] for c in classes], dtype=np.int64)
    try:
        ids = [int(c) for c in classes]
    except ValueError:
        raise ValueError(f"{source}: the weights file has no class names, so the data's classes must be the output "
                         f"indices 0..{num_classes - 1}; got {list(classes)[:8]}") from None
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise ValueError(f"{source}: class indices {bad[:8]} are outside the model's 0..{num_classes - 1}")
    return np.array(ids, dtype=np.int64)


def _normalizer(pre, channels: int) -> Normalizer:
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(1, channels, 1, 1)
    std = np.asarray(pre.std, dtype=np.float32).reshape(1, channels, 1, 1)
    return Normalizer(mean, std)


def _training_split(loaded):
    """The data record of a tinyvit file: ``(data path or None, test_fraction, split_seed)``."""
    meta = loaded.meta
    record = meta.get("data") if isinstance(meta.get("data"), dict) else meta.get("train_config")
    if not isinstance(record, dict) or "test_fraction" not in record:
        raise ValueError(f"{loaded.path}: the file does not say which data it was trained on; pass --data "
                         f"(a folder of class folders or an .npz)")
    return record.get("data"), float(record["test_fraction"]), int(record.get("split_seed", 0))


def load_eval_data(loaded, data=None, recipe: str = "auto", labels=None):
    """``(x (M, C, H, W) float32 normalised host images, y (M,) model indices, description)``.

    ``labels``: the model's class names to match the data's classes against (default: the file's)."""
    from ..pretrained.predict import preprocessing_for

    loaded = loaded._replace(labels=labels) if labels is not None else loaded
    model = loaded.model
    c = model.config
    pre = preprocessing_for(loaded, recipe)
    if data is None:
        source, fraction, seed = _training_split(loaded)
        try:
            ds = load_dataset(source)
        except FileNotFoundError as exc:
            raise ValueError(f"{exc}; the file was trained on it: pass --data to evaluate elsewhere") from None
        _, ds = split(ds, fraction, seed)
        what = (f"{'the bundled digits' if source is None else source}, test split "
                f"(test_fraction {fraction:g}, split_seed {seed}: the images training held out)")
        x = _check_array_data(ds.images, c, pre, what)
        return x, _class_map(ds.classes, loaded.labels, c.num_classes, what)[ds.labels], what
    if isinstance(data, str) and data in NAMED_DATASETS:  # every image of a named data set
        ds = load_dataset(data)
        x = _check_array_data(ds.images, c, pre, data)
        return x, _class_map(ds.classes, loaded.labels, c.num_classes, data)[ds.labels], f"{data} (all images)"
    data = os.fspath(data)
    if os.path.isdir(data):
        return _folder(data, loaded, pre)
    if not data.endswith(".npz"):
        if not os.path.exists(data):
            raise FileNotFoundError(f"data path {data!r} does not exist")
        raise ValueError(f"{data}: --data must be a folder of class folders or an .npz file")
    ds = load_npz(data)
    x = _check_array_data(ds.images, c, pre, data)
    return x, _class_map(ds.classes, loaded.labels, c.num_classes, data)[ds.labels], data


def _check_array_data(images, c, pre, source: str) -> np.ndarray:
    _, channels, height, width = images.shape
    if (channels, height, width) != (c.channels, *c.image_size):
        raise ValueError(f"{source}: images are {channels}x{height}x{width} (CxHxW) but the model expects "
                         f"{c.channels}x{c.image_size[0]}x{c.image_size[1]}; use a folder of image files "
                         f"(resized on reading) or resize the array")
    return _normalizer(pre, channels)(images)


def _folder(root: str, loaded, pre):
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class subfolders (expected {root}/<class name>/<image files>)")
    targets = _class_map(classes, loaded.labels, loaded.model.config.num_classes, root)
    xs, ys = [], []
    for k, name in enumerate(classes):
        folder = os.path.join(root, name)
        for file in sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES)):
            xs.append(pre(os.path.join(folder, file)).pixels)  # (C, H, W)
            ys.append(targets[k])
    if not xs:
        raise ValueError(f"{root}: no image files (ending in {', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), root


def accuracy(model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> tuple:
    """``(correct, count)`` of ``argmax model.forward(x)`` against ``y`` over host images ``x``."""
    correct = 0
    for start in range(0, len(y), batch_size):
        xb = model.backend.asarray(np.ascontiguousarray(x[start:start + batch_size]), dtype=model.dtype)
        pred = model.backend.to_host(model.forward(xb, keep_cache=False).argmax(axis=1))  # (B,)
        correct += int((pred == y[start:start + batch_size]).sum())
    return correct, len(y)


def run_eval(args) -> int:
    from ..pretrained.predict import describe, open_from_args

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    from ..pretrained.predict import class_names

    loaded = open_from_args(args)
    if args.tome_r is not None:  # ToMe off the shelf: the trained weights, r tokens merged per block
        loaded.model.set_tome(args.tome_r)
    names, source = class_names(loaded.model.config.num_classes, args.labels, loaded.labels, loaded.kind)
    labels = names if not source.startswith("none") else None  # ImageNet's names for a 1,000-class file
    x, y, what = load_eval_data(loaded, args.data, args.recipe, labels)
    correct, count = accuracy(loaded.model, x, y, args.batch_size)
    info = sys.stderr if args.json else sys.stdout
    for line in describe(loaded, args.recipe):
        print(line, file=info)
    if args.json:
        print(json.dumps({"accuracy": correct / count, "images": count, "correct": correct, "data": what,
                          "weights": os.fspath(args.weights)}))
    else:
        print(f"data: {what}")
        print(f"accuracy: {100 * correct / count:.2f}% ({correct} of {count} images)")
    return 0


def register(subparsers) -> None:
    from ..pretrained.predict import add_weights_arguments

    p = subparsers.add_parser("eval", help="accuracy of a weights file on a data set (default: its own test split)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="a folder of class folders, or an .npz of images and labels "
                                                "(default: the test split the file was trained with)")
    add_weights_arguments(p)
    p.add_argument("--batch-size", type=int, default=256, help="images per forward (default 256)")
    p.add_argument("--json", action="store_true", help="print {accuracy (a fraction), images, correct, ...} as JSON")
    p.add_argument("--tome-r", type=int, default=None,
                   help="token merging (ToMe) on the trained model: tokens merged per block (docs/tome.md)")
    p.set_defaults(func=run_eval)
