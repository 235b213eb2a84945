"""Parameter and FLOP calculator for the ViTs tinyvit builds, by formula, without building one.

Counts are per image unless a batch is given. A multiply-add (MAC) is counted once in
``macs`` and as two FLOPs in ``flops``; the published "GFLOPs" of ViTs (fvcore, the DeiT
and timm tables) are in fact GMACs of the matrix products, which is what
:func:`forward_macs` returns:

==========  ===========  ======
model       parameters   GMACs
==========  ===========  ======
ViT-Ti/16    5,717,416    1.25
ViT-S/16    22,050,664    4.60
ViT-B/16    86,567,656   17.56
==========  ===========  ======

Forward MACs, per image, with ``Np`` patches, ``N`` tokens, ``D`` width, ``F`` MLP width,
``K`` classes, ``C*P*P`` values per patch::

    patch embedding   Np * (C*P*P) * D
    per block         N * D * 3D        (qkv)
                      N * N * D         (q @ k^T, all heads together: NH * N * N * hs)
                      N * N * D         (att @ v)
                      N * D * D         (proj)
                      2 * N * D * F     (fc1, fc2)
    head              D * K             (per head; a distilled model has two)

The backward of a matrix product costs two products of the same size (``dx`` and ``dw``),
so a training step (forward + backward, which in tinyvit also returns ``dx`` for the
image) is three forwards' worth of matrix work: :func:`train_step_flops`.

Elementwise layers are counted with a nominal FLOP count per element (stated in
:data:`ELEMENTWISE_FLOPS`), only so that their GFLOP/s can be printed; they are memory
bound and their time, not their FLOPs, is what the benchmarks compare.
"""
from __future__ import annotations

from ..model import ViTConfig, param_shapes

# The three ViTs of the ViT paper / DeiT at 224 (timm's vit_{tiny,small,base}_patch16_224)
# and the CIFAR-size model of the benchmarks.
PRESETS = {
    "vit_ti16": dict(image_size=224, patch_size=16, num_classes=1000, dim=192, depth=12, heads=3, mlp_dim=768),
    "vit_s16": dict(image_size=224, patch_size=16, num_classes=1000, dim=384, depth=12, heads=6, mlp_dim=1536),
    "vit_b16": dict(image_size=224, patch_size=16, num_classes=1000, dim=768, depth=12, heads=12, mlp_dim=3072),
    "cifar": dict(image_size=32, patch_size=4, num_classes=10, dim=192, depth=6, heads=3, mlp_dim=384),
}

# Nominal FLOPs per element of the elementwise layers (forward, backward), by convention:
# LayerNorm: mean, centre, square, mean, scale, affine (fwd); the three-term formula (bwd).
# GELU: the erf/tanh counted as one op. Softmax: max, subtract, exp, sum, divide.
ELEMENTWISE_FLOPS = {
    "layernorm": (8, 12),
    "gelu": (8, 12),
    "softmax": (5, 4),
    "rope": (3, 6),  # per element of q or k: a c - b s (fwd); the turn back, and dtheta = db out_a - da out_b (bwd)
}


def as_config(config) -> ViTConfig:
    """A :class:`ViTConfig` from a config, a dict of its fields, or a preset name."""
    if isinstance(config, ViTConfig):
        return config
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown model preset {config!r}; presets: {sorted(PRESETS)}")
        return ViTConfig(**PRESETS[config])
    if isinstance(config, dict):
        return ViTConfig(**config)
    raise TypeError(f"config must be a ViTConfig, a dict of its fields or a preset name, got {type(config).__name__}")


def count_params(config) -> int:
    """The number of parameters, from the shapes :func:`tinyvit.model.param_shapes` gives."""
    total = 0
    for shape in param_shapes(as_config(config)).values():
        size = 1
        for n in shape:
            size *= n
        total += size
    return total


def macs_by_layer(config, batch: int = 1, train: bool = False) -> dict:
    """Forward MACs of every matrix product, summed over the blocks, for ``batch`` images.

    Keys: ``patch_embed``, ``qkv``, ``attn_scores`` (q @ k^T), ``attn_values`` (att @ v),
    ``proj``, ``fc1``, ``fc2``, ``head``, and ``tome_match`` when ``tome_r > 0``.

    Fewer tokens, fewer heads (docs/tome.md, docs/head_pruning.md): with ``tome_r = r`` block ``i``
    runs its attention on ``N - i r`` tokens and its MLP on ``N - (i + 1) r`` (the merge sits
    between them), and its matching scores ``ceil(n/2) floor(n/2)`` pairs of ``hs``-wide keys
    (``tome_match``); a pruned block's ``qkv``, scores, values and ``proj`` use its own
    ``NH_i hs`` instead of ``D``; ``train=True`` with ``patch_drop_rate`` counts the
    ``T + max(1, int(Np (1 - p)))`` tokens the blocks see in training.
    """
    c = as_config(config)
    n0, d, f, depth = c.num_tokens, c.dim, c.mlp_dim, c.depth
    r = getattr(c, "tome_r", 0)
    drop = getattr(c, "patch_drop_rate", 0.0)
    if train and drop:
        n0 = c.num_prefix_tokens + max(1, int(c.num_patches * (1.0 - drop)))
    patch_values = c.channels * c.patch_size * c.patch_size
    heads_out = 2 if c.distilled else 1
    per_image = dict.fromkeys(("qkv", "attn_scores", "attn_values", "proj", "fc1", "fc2"), 0)
    match = 0
    hs = c.dim // c.heads
    for i in range(depth):
        n = n0 - i * r  # tokens the attention of block i sees
        e = (c.heads_of(i) if hasattr(c, "heads_of") else c.heads) * hs  # NH_i hs (= D unless pruned)
        pairs = attention_pairs(c) if n == c.num_tokens else n * n
        per_image["qkv"] += n * d * 3 * e
        per_image["attn_scores"] += pairs * e
        per_image["attn_values"] += pairs * e
        per_image["proj"] += n * e * d
        per_image["fc1"] += (n - r) * d * f
        per_image["fc2"] += (n - r) * f * d
        if r:
            match += ((n + 1) // 2) * (n // 2) * hs
    per_image = {"patch_embed": c.num_patches * patch_values * d, **per_image, "head": heads_out * d * c.num_classes}
    if r:
        per_image["tome_match"] = match
    return {k: v * batch for k, v in per_image.items()}


def attention_pairs(config) -> int:
    """(query, key) pairs scored per head and image: ``N^2`` for global attention; with
    ``attn_window=M`` each patch scores its window's ``M^2`` tokens and the ``T`` prefix tokens,
    and each prefix token all ``N``: ``Np (T + M^2) + T N``."""
    c = as_config(config)
    m = getattr(c, "attn_window", 0)
    if not m:
        return c.num_tokens ** 2
    t = c.num_prefix_tokens
    return c.num_patches * (t + m * m) + t * c.num_tokens


def forward_macs(config, batch: int = 1) -> int:
    """Forward MACs of all matrix products for ``batch`` images (the published 'GFLOPs')."""
    return sum(macs_by_layer(config, batch).values())


def forward_flops(config, batch: int = 1) -> int:
    """Forward FLOPs of the matrix products: ``2 * forward_macs``."""
    return 2 * forward_macs(config, batch)


def train_step_flops(config, batch: int = 1) -> int:
    """Matrix FLOPs of a training step: forward, plus a backward that costs two forwards; with
    ``attn_impl="flash"`` the backward also recomputes ``q k^T`` (one more score product).
    PatchDropout's shorter training sequence is counted; ToMe's matching has no backward."""
    c = as_config(config)
    macs = macs_by_layer(c, batch, train=True)
    total = 2 * (3 * sum(macs.values()) - 2 * macs.get("tome_match", 0))
    if getattr(c, "attn_impl", "plain") == "flash":
        total += 2 * macs_by_layer(c, batch)["attn_scores"]
    return total


def attention_share(config) -> float:
    """The fraction of forward MACs in the two ``N x N`` attention products (quadratic in N)."""
    by_layer = macs_by_layer(config)
    return (by_layer["attn_scores"] + by_layer["attn_values"]) / sum(by_layer.values())


# ---------------------------------------------------------------- per-layer counts (bench)
def linear_flops(rows: int, d_in: int, d_out: int) -> tuple:
    """(forward, backward) FLOPs of ``(rows, d_in) @ (d_in, d_out)``; backward is dx and dw."""
    fwd = 2 * rows * d_in * d_out
    return fwd, 2 * fwd


def attention_flops(batch: int, tokens: int, dim: int) -> tuple:
    """(forward, backward) matrix FLOPs of multi-head self-attention with its qkv and proj."""
    rows = batch * tokens
    fwd = 2 * rows * dim * 3 * dim + 2 * 2 * batch * tokens * tokens * dim + 2 * rows * dim * dim
    return fwd, 2 * fwd


def mlp_flops(batch: int, tokens: int, dim: int, hidden: int) -> tuple:
    """(forward, backward) matrix FLOPs of fc1 and fc2."""
    fwd = 2 * 2 * batch * tokens * dim * hidden
    return fwd, 2 * fwd


def block_flops(batch: int, tokens: int, dim: int, hidden: int) -> tuple:
    """(forward, backward) matrix FLOPs of one encoder block (attention + MLP)."""
    a = attention_flops(batch, tokens, dim)
    m = mlp_flops(batch, tokens, dim, hidden)
    return a[0] + m[0], a[1] + m[1]


def elementwise_flops(kind: str, elements: int) -> tuple:
    """(forward, backward) nominal FLOPs of an elementwise layer (see :data:`ELEMENTWISE_FLOPS`)."""
    fwd, bwd = ELEMENTWISE_FLOPS[kind]
    return fwd * elements, bwd * elements
