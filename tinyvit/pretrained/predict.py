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

import os
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


def class_names(num_classes: int, labels_file=None, checkpoint_labels=None) -> tuple:
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
        return list(checkpoint_labels), "the checkpoint's config.json"
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
def _load(args):
    """The model, its checkpoint record, the preprocessed image and the recipe, from CLI args."""
    from .preprocess import preprocess
    from .weights import read_checkpoint

    from ..model import VisionTransformer

    image_size = None if args.image_size is None else (args.image_size, args.image_size)
    ckpt = read_checkpoint(args.weights, layout=args.layout, heads=args.heads, layer_norm_eps=args.eps,
                           image_size=image_size, gelu=args.gelu)
    model = VisionTransformer(**ckpt.config, backend=args.backend, dtype=args.dtype)
    model.load_state_dict(ckpt.state_dict)
    height, width = model.config.image_size
    if height != width:
        raise ValueError(f"the model expects {height}x{width} images; predict/attention crop squares: "
                         f"pass --image-size")
    recipe = args.recipe if args.recipe != "auto" else ("hf" if ckpt.layout == "hf" else "tutorial")
    pre = preprocess(args.image, recipe, height)
    x = model.backend.asarray(pre.pixels[None], dtype=model.dtype)  # (1, C, S, S)
    return model, ckpt, pre, recipe, x


def _describe(model, ckpt, recipe) -> list:
    c = model.config
    lines = [f"{ckpt.layout} checkpoint -> ViT {c.image_size[0]}x{c.image_size[1]}, patch {c.patch_size}, "
             f"dim {c.dim}, depth {c.depth}, heads {c.heads}, {c.num_classes} classes, eps {c.layer_norm_eps:g}; "
             f"preprocessing: {recipe}"]
    lines += [f"note: {n}" for n in ckpt.notes]
    return lines


def run_predict(args) -> int:
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    model, ckpt, pre, recipe, x = _load(args)
    names, source = class_names(model.config.num_classes, args.labels, ckpt.labels)
    logits = to_host(model.forward(x))[0]  # (K,)
    indices, probs = top_k(logits, args.top)
    for line in _describe(model, ckpt, recipe):
        print(line)
    print(f"class names: {source}")
    print(f"{'rank':>4}  {'prob':>7}  {'class':>5}  name")
    for rank, (i, p) in enumerate(zip(indices, probs), start=1):
        print(f"{rank:>4}  {p:7.4f}  {int(i):>5}  {names[int(i)]}")
    return 0


def run_attention(args) -> int:
    model, ckpt, pre, recipe, x = _load(args)
    logits = to_host(model.forward(x))[0]  # (K,)
    maps = model.attention_maps()  # depth x (1, NH, N, N)
    c = model.config
    heads_map = to_host(cls_attention(maps[-1], c.num_prefix_tokens, c.grid))[0]  # (NH, gh, gw)
    rollout = attention_rollout(maps)  # (1, N, N)
    rollout_map = to_host(rollout[0, 0, c.num_prefix_tokens:]).reshape(c.grid)  # (gh, gw)
    names, _ = class_names(c.num_classes, args.labels, ckpt.labels)
    best, prob = top_k(logits, 1)
    title = f"top-1: {names[int(best[0])]} ({prob[0]:.3f})"
    draw_attention(pre.image, heads_map, rollout_map, args.output, title)
    for line in _describe(model, ckpt, recipe):
        print(line)
    print(f"{title}; wrote {args.output} (rollout over {c.depth} blocks + {c.heads} heads of the last block)")
    return 0


def _common(p) -> None:
    p.add_argument("image", help="an image file (anything Pillow reads)")
    p.add_argument("--weights", required=True, help=".safetensors, .npz, or .pth/.bin (needs PyTorch); timm, "
                                                      "torchvision or Hugging Face layout, detected from the keys")
    p.add_argument("--heads", type=int, default=None,
                   help="attention heads (shapes do not tell; default: 3/6/12/16/16 for width 192/384/768/1024/1280)")
    p.add_argument("--eps", type=float, default=None,
                   help="LayerNorm eps (default: 1e-6 timm/torchvision, 1e-12 or config.json for Hugging Face)")
    p.add_argument("--gelu", choices=("none", "tanh"), default=None, help="GELU form (default: exact)")
    p.add_argument("--layout", choices=("timm", "torchvision", "hf"), default=None, help="override detection")
    p.add_argument("--image-size", type=int, default=None,
                   help="run at this size; the position embedding is resampled bicubic (default: the checkpoint's)")
    p.add_argument("--recipe", choices=("auto", "tutorial", "hf"), default="auto",
                   help="preprocessing: tutorial = Resize(256)/CenterCrop(224)/ImageNet mean-std; hf = resize 224, "
                        "mean-std 0.5 (auto: hf for Hugging Face checkpoints, else tutorial)")
    p.add_argument("--labels", default=None, help="a text file with one class name per line")
    p.add_argument("--backend", choices=("numpy", "cupy"), default=None, help="default: $TINYVIT_BACKEND or numpy")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="top-k classes of an image under a pretrained ViT checkpoint")
    _common(p)
    p.add_argument("--top", type=int, default=5, help="how many classes to print (default 5)")
    p.set_defaults(func=run_predict)
    p = subparsers.add_parser("attention", help="draw a pretrained ViT's attention over an image")
    _common(p)
    p.add_argument("-o", "--output", required=True, help="the PNG to write")
    p.set_defaults(func=run_attention)
