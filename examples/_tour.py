"""What every chapter of the tour shares: its command line, the bundled pictures, saving figures.

Each chapter is run as ``python3 examples/NN_name.py [--out DIR] [--quick]``:

- ``--out DIR``: where its pictures go (default ``runs/tour``, which git ignores, so running the
  tour never rewrites the committed pictures; ``--out docs/images`` redraws those, where the
  README links them);
- ``--quick``: fewer steps and smaller sizes, for the tests (the printed shapes stay the same).

The pictures are ``examples/data/*.png`` (two CC BY 2.0 photos, see ``examples/data/README.md``)
and the digits bundled with tinyvit (``tinyvit/data/digits.csv.gz``: 1797 images of 8x8 pixels).
"""
from __future__ import annotations

import argparse
import os
import sys

# The tour's matrices are small (a few hundred rows): one BLAS thread does them faster than
# many, and on a busy machine far faster (measured: a (96, 1088) @ (1088, 32) product took
# 11.6 ms with OpenBLAS's default threads on a loaded 2-core machine, 0.17 ms with one).
# It only works before NumPy loads (so a process that imported NumPy already, like the tests
# loading a chapter as a module, is left alone); a value already in the environment wins.
if "numpy" not in sys.modules:
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(ROOT, "runs", "tour")  # runs/ is in .gitignore: docs/images changes only when asked


def _missing_module_hook(kind, value, tb, _previous=sys.excepthook):
    """A chapter run without the tour's extra stops with one line saying what to install, not a traceback."""
    if issubclass(kind, ModuleNotFoundError) and getattr(value, "name", None):
        top = value.name.split(".")[0]
        print(f"{os.path.basename(sys.argv[0])}: this chapter needs {top!r}, which is not installed: "
              f"pip install -e '.[examples]' (matplotlib, and PyTorch for chapters 00, 04 and 05)", file=sys.stderr)
        sys.exit(1)
    _previous(kind, value, tb)


sys.excepthook = _missing_module_hook

try:  # run from a checkout without `pip install -e .`: use the tinyvit next to this folder
    import tinyvit  # noqa: F401
except ImportError:
    sys.path.insert(0, ROOT)

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, never a window


ENCODER_LAYER_NAMES = {  # timm's block keys -> PyTorch's nn.TransformerEncoderLayer's (chapters 00 and 05)
    "attn.qkv.weight": "self_attn.in_proj_weight", "attn.qkv.bias": "self_attn.in_proj_bias",
    "attn.proj.weight": "self_attn.out_proj.weight", "attn.proj.bias": "self_attn.out_proj.bias",
    "mlp.fc1.weight": "linear1.weight", "mlp.fc1.bias": "linear1.bias",
    "mlp.fc2.weight": "linear2.weight", "mlp.fc2.bias": "linear2.bias",
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
}


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="folder for the pictures (default: runs/tour; --out docs/images redraws the committed ones)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, for the tests")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    return args


def banner(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 74 - len(title)))


def photo(name: str = "china") -> np.ndarray:
    """A bundled 224x224 photo as float32 ``(H, W, 3)`` in ``[0, 1]``."""
    import matplotlib.image

    path = os.path.join(HERE, "data", f"{name}_224.png")
    image = matplotlib.image.imread(path)  # PNG -> float32 in [0, 1]
    return np.ascontiguousarray(image[..., :3], dtype=np.float32)  # (224, 224, 3)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits (``tinyvit.training.data.load_digits``): images float32 ``(1797, 1, 8, 8)`` in
    ``[0, 1]``, labels int64 ``(1797,)``."""
    from tinyvit.training.data import load_digits

    ds = load_digits()
    return ds.images, ds.labels


def split(images, labels, test_fraction: float = 0.25, seed: int = 0):
    """A fixed shuffled train/test split: ``(x_train, y_train, x_test, y_test)``."""
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(len(labels) * (1.0 - test_fraction))
    train, test = order[:cut], order[cut:]
    return images[train], labels[train], images[test], labels[test]


def save(fig, args, name: str) -> str:
    """Write ``fig`` to ``args.out/name`` (PNG) and close it."""
    import matplotlib.pyplot as plt

    path = os.path.join(args.out, name)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {os.path.relpath(path)}")
    return path


def max_err(a, b) -> tuple[float, float]:
    """(max abs error, max abs error relative to max |b|) between two arrays."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    abs_err = float(np.max(np.abs(a - b))) if a.size else 0.0
    return abs_err, abs_err / max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-300)
