"""``tinyvit predict`` and ``tinyvit attention``: run a pretrained checkpoint on one image.

``predict`` prints the top-k classes with their probabilities (ImageNet's 1,000 names
ship in ``tinyvit/data/imagenet_classes.txt``, torchvision's list). ``attention`` draws
where the model looks: the last block's class-token attention, one panel per head, and
the attention rollout of Abnar & Zuidema (2020, "Quantifying Attention Flow in
Transformers") over all blocks.

Rollout. Block ``l`` mixes tokens by its head-averaged attention ``A_l (N, N)`` *and*
keeps the residual path, so the flow through one block is ``Â_l = 0.5 A_l + 0.5 I``
(rows still sum to 1). Through all blocks it is the product
``R = Â_L @ ... @ Â_2 @ Â_1`` (row-stochastic too); row 0 of ``R`` restricted to the
patch tokens says how much each patch fed the class token.
"""
from __future__ import annotations

import json
import os
import sys
from importlib import resources

import numpy as np

from ..backend import array_module, to_host
from ..training.checkpoint import atomic_save_figure

CLASS_FILE = "imagenet_classes.txt"


# ------------------------------------------------------------------ class names and top-k
def imagenet_classes() -> list:
    """The 1,000 ImageNet-1k class names, in index order (torchvision's names)."""
    text = resources.files("tinyvit").joinpath("data", CLASS_FILE).read_text(encoding="utf-8")
    return text.splitlines()


def class_names(num_classes: int, labels_file=None, checkpoint_labels=None, kind: str = "foreign") -> tuple:
    """``(names, source)``: a labels file (one name per line) if given, else the checkpoint's
    own labels (a Hugging Face ``config.json``), else ImageNet's for 1,000 classes, else
    ``"class {i}"``. A labels file whose line count is not ``num_classes`` is an error."""
    if labels_file is not None:
        with open(labels_file, encoding="utf-8") as f:
            names = [line.rstrip("\n") for line in f if line.strip()]
        if len(names) != num_classes:
            raise ValueError(f"labels file {labels_file!r} has {len(names)} names but the model has "
                             f"{num_classes} classes")
        return names, labels_file
    if checkpoint_labels is not None:
        return list(checkpoint_labels), ("the checkpoint's config.json" if kind == "foreign"
                                          else f"the {kind} file's metadata")
    if num_classes == 1000:
        return imagenet_classes(), "ImageNet-1k"
    return [f"class {i}" for i in range(num_classes)], "none (no names for this class count)"


def top_k(logits, k: int = 5) -> tuple:
    """``logits: (K,)`` -> ``(indices (k,), probabilities (k,))``, softmax in float64 on the host."""
    z = np.asarray(to_host(logits), dtype=np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    k = min(k, p.size)
    order = np.argsort(-p, kind="stable")[:k]
    return order, p[order]


# ------------------------------------------------------------------ attention maps
def cls_attention(attn, num_prefix_tokens: int, grid: tuple):
    """``attn: (B, NH, N, N)`` -> ``(B, NH, gh, gw)``: row 0 (the class token) over the patches."""
    b, nh = attn.shape[:2]
    return attn[:, :, 0, num_prefix_tokens:].reshape(b, nh, grid[0], grid[1])  # (B, NH, Np) -> (B, NH, gh, gw)


def attention_rollout(maps: list, residual: float = 0.5):
    """Attention rollout: ``maps``, one ``(B, NH, N, N)`` per block -> ``R: (B, N, N)``.

    ``Â_l = (1 - residual) * mean_heads(A_l) + residual * I``, ``R = Â_L ... Â_1``
    (Abnar & Zuidema, 2020). Each row of ``R`` sums to 1. Runs on the maps' backend.
    """
    if not maps:
        raise ValueError("attention_rollout needs at least one attention map")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be in [0, 1], got {residual}")
    xp = array_module(maps[0])
    n = maps[0].shape[-1]
    eye = xp.eye(n, dtype=maps[0].dtype)  # (N, N)
    rollout = None
    for attn in maps:
        a = attn.mean(axis=1) * (1.0 - residual) + eye * residual  # (B, N, N)
        a = a / a.sum(axis=-1, keepdims=True)  # guard the rows against rounding
        rollout = a if rollout is None else a @ rollout  # (B, N, N) @ (B, N, N) -> (B, N, N)
    return rollout


def draw_attention(image, heads_map: np.ndarray, rollout_map: np.ndarray, path, title: str = "") -> None:
    """Save a PNG: the image, the rollout over it, then one panel per head (last block).

    ``image``: the S x S PIL image the model saw; ``heads_map: (NH, gh, gw)``;
    ``rollout_map: (gh, gw)``. Written to a temp file in the same folder, then renamed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("drawing needs matplotlib: pip install matplotlib (or 'tinyvit[pretrained]')") from None
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder!r} does not exist")
    img = np.asarray(image)
    h, w = img.shape[:2]
    panels = [("image", None), ("rollout, all blocks", rollout_map)]
    panels += [(f"last block, head {i}", m) for i, m in enumerate(heads_map)]
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, heat) in zip(axes.ravel(), panels):
        ax.imshow(img, extent=(0, w, h, 0))
        if heat is not None:
            heat = heat / max(float(heat.max()), 1e-12)
            ax.imshow(heat, cmap="inferno", alpha=0.6, extent=(0, w, h, 0), interpolation="bilinear", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------ shared command plumbing
def open_from_args(args):
    """The :class:`~tinyvit.pretrained.weights.Loaded` model a command's arguments name."""
    from .weights import open_model

    if args.gelu == "exact":
        args.gelu = "none"  # the model's name for the erf GELU
    image_size = None if args.image_size is None else (args.image_size, args.image_size)
    return open_model(args.weights, layout=args.layout, heads=args.heads, layer_norm_eps=args.eps,
                      image_size=image_size, gelu=args.gelu, backend=args.backend, dtype=args.dtype, pool=args.pool)


def preprocessing_for(loaded, recipe: str = "auto"):
    """The :class:`~tinyvit.pretrained.preprocess.Preprocessing` to use: ``"auto"`` is the file's own
    (a tinyvit file: as the model was trained), else ``hf`` for Hugging Face files and
    ``tutorial`` for the rest; a named recipe is built for the model's size and channels."""
    from .preprocess import Preprocessing

    c = loaded.model.config
    if recipe == "auto" and loaded.preprocessing is not None:
        return loaded.preprocessing
    if recipe == "auto":
        recipe = "hf" if loaded.layout == "hf" else "tutorial"
    height, width = c.image_size
    if recipe == "tutorial" and height != width:
        raise ValueError(f"the model expects {height}x{width} images; the tutorial recipe crops squares: "
                         f"use --recipe hf (resize to {height}x{width}) or --image-size")
    if c.channels not in (1, 3):
        raise ValueError(f"the model reads {c.channels}-channel images; images are read as grey (1) or RGB (3)")
    return Preprocessing.recipe(recipe, c.image_size, c.channels)


def describe(loaded, recipe: str = "auto") -> list:
    c = loaded.model.config
    pre = preprocessing_for(loaded, recipe)
    what = {"checkpoint": "tinyvit training checkpoint", "export": f"tinyvit export ({loaded.layout} layout)"}.get(
        loaded.kind, f"{loaded.layout} file")
    lines = [f"{what} -> ViT {c.image_size[0]}x{c.image_size[1]}, "
             f"patch {c.patch_size}, {c.channels} channel{'s' if c.channels > 1 else ''}, dim {c.dim}, depth {c.depth}, "
             f"heads {c.heads}, {c.num_classes} classes, eps {c.layer_norm_eps:g}, gelu {c.gelu}, "
             f"{'pre' if c.norm_first else 'post'}-norm, pool {c.pool}; preprocessing: {pre.describe()}"]
    if loaded.notes:
        lines.append("loaded as: " + "; ".join(loaded.notes))
    return lines


def _load(args):
    loaded = open_from_args(args)
    pre = preprocessing_for(loaded, args.recipe)(args.image)
    model = loaded.model
    x = model.backend.asarray(pre.pixels[None], dtype=model.dtype)  # (1, C, H, W)
    return loaded, pre, x


def run_predict(args) -> int:
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    loaded, pre, x = _load(args)
    model = loaded.model
    names, source = class_names(model.config.num_classes, args.labels, loaded.labels, loaded.kind)
    logits = to_host(model.forward(x))[0]  # (K,)
    indices, probs = top_k(logits, args.top)
    info = sys.stderr if args.json else sys.stdout
    for line in describe(loaded, args.recipe):
        print(line, file=info)
    print(f"class names: {source}", file=info)
    if args.json:
        print(json.dumps([{"label": names[int(i)], "index": int(i), "probability": float(p)}
                          for i, p in zip(indices, probs)]))
        return 0
    print(f"{'rank':>4}  {'prob':>7}  {'class':>5}  name")
    for rank, (i, p) in enumerate(zip(indices, probs), start=1):
        print(f"{rank:>4}  {p:7.4f}  {int(i):>5}  {names[int(i)]}")
    return 0


def run_attention(args) -> int:
    loaded, pre, x = _load(args)
    model = loaded.model
    logits = to_host(model.forward(x))[0]  # (K,)
    maps = model.attention_maps()  # depth x (1, NH, N, N)
    c = model.config
    heads_map = to_host(cls_attention(maps[-1], c.num_prefix_tokens, c.grid))[0]  # (NH, gh, gw)
    rollout = attention_rollout(maps)  # (1, N, N)
    rollout_map = to_host(rollout[0, 0, c.num_prefix_tokens:]).reshape(c.grid)  # (gh, gw)
    names, _ = class_names(c.num_classes, args.labels, loaded.labels, loaded.kind)
    best, prob = top_k(logits, 1)
    title = f"top-1: {names[int(best[0])]} ({prob[0]:.3f})"
    draw_attention(pre.image, heads_map, rollout_map, args.output, title)
    for line in describe(loaded, args.recipe):
        print(line)
    print(f"{title}; wrote {args.output} (rollout over {c.depth} blocks + {c.heads} heads of the last block)")
    return 0


def run_export(args) -> int:
    from .weights import export_pretrained

    loaded = open_from_args(args)
    data = None
    record = loaded.meta.get("data") or loaded.meta.get("train_config")
    if isinstance(record, dict) and "test_fraction" in record:  # so tinyvit eval finds the test split again
        data = {k: record.get(k) for k in ("data", "test_fraction", "split_seed", "fingerprint") if k in record}
    labels = None
    if args.labels is not None:
        labels, _ = class_names(loaded.model.config.num_classes, args.labels)
    export_pretrained(loaded.model, args.output, args.layout_out, labels=labels, data=data)
    for line in describe(loaded):
        print(line)
    print(f"wrote {args.output} ({args.layout_out} layout, with the config, labels and preprocessing in its metadata)")
    return 0


def add_weights_arguments(p, image: bool = False) -> None:
    """The arguments every command that reads a weights file takes."""
    if image:
        p.add_argument("image", help="an image file (anything Pillow reads)")
    p.add_argument("--weights", required=True,
                   help="a tinyvit train checkpoint or export (.safetensors/.npz: config, labels and preprocessing "
                        "come from the file), or a timm, torchvision or Hugging Face file (.safetensors, .npz, "
                        ".pth/.bin with PyTorch; layout detected from the keys)")
    p.add_argument("--heads", type=int, default=None,
                   help="attention heads of a foreign file (shapes do not tell; default: 3/6/12/16/16 for width "
                        "192/384/768/1024/1280); a tinyvit file knows its own")
    p.add_argument("--eps", type=float, default=None,
                   help="LayerNorm eps of a foreign file (default: 1e-6 timm/torchvision, 1e-12 or config.json for "
                        "Hugging Face)")
    p.add_argument("--gelu", choices=("exact", "tanh", "none"), default=None,
                   help="GELU form of a foreign file: exact = erf (also 'none', PyTorch's name), tanh = the tanh "
                        "approximation (default: exact, or config.json's hidden_act)")
    p.add_argument("--pool", choices=("cls", "mean"), default=None,
                   help="pooling of a foreign file: cls = the class token (with fc_norm.*: timm's global_pool='token', "
                        "fc_norm=True), mean = the mean of the patch tokens (default: mean if fc_norm.* is present)")
    p.add_argument("--layout", choices=("timm", "torchvision", "hf"), default=None, help="override detection")
    p.add_argument("--image-size", type=int, default=None,
                   help="run at this size; the position embedding is resampled bicubic (default: the file's)")
    p.add_argument("--recipe", choices=("auto", "tutorial", "hf"), default="auto",
                   help="preprocessing. auto: the file's own (a tinyvit file: as trained), else hf for Hugging Face "
                        "files and tutorial for the rest; tutorial = Resize(256)/CenterCrop(224)/ImageNet mean-std; "
                        "hf = resize to 224, mean-std 0.5")
    p.add_argument("--labels", default=None, help="a text file with one class name per line (default: the file's)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default=None, help="default: $TINYVIT_BACKEND or numpy")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="default: the file's (tinyvit files), else float32")


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="top-k classes of an image under a weights file")
    add_weights_arguments(p, image=True)
    p.add_argument("--top", type=int, default=5, help="how many classes to print (default 5)")
    p.add_argument("--json", action="store_true",
                   help="print the top-k as a JSON list of {label, index, probability} (the rest goes to stderr)")
    p.set_defaults(func=run_predict)
    p = subparsers.add_parser("attention", help="draw a ViT's attention over an image")
    add_weights_arguments(p, image=True)
    p.add_argument("-o", "--output", required=True,
                   help="the picture to write; its suffix names the format: .png, .jpg/.jpeg, .pdf or .svg")
    p.set_defaults(func=run_attention)
    p = subparsers.add_parser("export", help="write a weights file (e.g. a training checkpoint) for other libraries "
                                             "or for tinyvit, with its config, labels and preprocessing")
    add_weights_arguments(p)
    p.add_argument("-o", "--output", required=True, help="the .safetensors or .npz to write")
    p.add_argument("--to", dest="layout_out", choices=("tinyvit", "timm", "torchvision", "hf"), default="tinyvit",
                   help="key layout to write (default tinyvit: timm's keys, holds every model tinyvit builds; the "
                        "others refuse models their library cannot run)")
    p.set_defaults(func=run_export)
