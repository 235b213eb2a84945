"""Head importance and head pruning on a :class:`~tinyvit.VisionTransformer`.

Derivation: docs/head_pruning.md (the learners' tour: examples/13_fewer_tokens.py)

Importance (Michel et al., *Are Sixteen Heads Really Better than One?*, 2019): put a gate
``xi_h = 1`` on the output of each head (``model.set_head_gates``), run the loss forward and
backward over some batches, and take ``I_h = mean over batches of |dL/dxi_h|``; the gate's
gradient is ``sum_{b,n} O_h . dO_h``, a reduction of arrays the attention backward already has
(layers/gates.py). Each block's scores are divided by their L2 norm, as Michel et al. do.

Pruning removes head ``h`` of block ``i`` for real: its ``hs`` rows in each of q, k and v of the
fused ``qkv`` weight (and bias), and its ``hs`` columns of ``proj``. The block then runs with
fewer heads of the same width ``hs = D / NH``, and its output is exactly the original block's
with ``xi_h = 0``.
"""
from __future__ import annotations

import numpy as np

from ..backend import to_host
from ..layers.loss import softmax_cross_entropy
from ..model import VisionTransformer


def head_importance(model: VisionTransformer, batches, normalize: bool = True) -> list:
    """``batches``: an iterable of ``(images (B, C, H, W), labels (B,))`` (host or backend arrays).

    Returns one host ``(NH_i,)`` float64 array per block: the mean over batches of
    ``|dL/dxi_h|`` (cross-entropy ``L``, evaluation mode: no dropout), each block divided by
    its L2 norm when ``normalize``. The model's gates, gradients and caches are restored."""
    saved_gates, saved_grads = dict(model.head_gates), dict(model.grads)
    c = model.config
    total = [np.zeros(c.heads_of(i)) for i in range(c.depth)]
    count = 0
    try:
        model.set_head_gates({i: np.ones(c.heads_of(i)) for i in range(c.depth)})
        for images, labels in batches:
            x = images if model.backend.owns(images) else model.backend.asarray(np.asarray(images), dtype=model.dtype)
            y = labels if model.backend.owns(labels) else model.backend.asarray(np.asarray(labels))
            logits = model.forward(x, train=False)
            _, dlogits = softmax_cross_entropy(logits, y)
            model.backward(dlogits, keep_cache=False)
            for i in range(c.depth):
                total[i] += np.abs(np.asarray(to_host(model.gate_grads[i]), dtype=np.float64))
            count += 1
    finally:
        model.set_head_gates(saved_gates)
        model.grads = saved_grads
    if count == 0:
        raise ValueError("head_importance needs at least one batch of (images, labels)")
    scores = [t / count for t in total]
    if normalize:
        scores = [s / (np.linalg.norm(s) + 1e-20) for s in scores]
    return scores


def least_important(importance: list, count: int) -> dict:
    """The ``count`` heads of lowest importance over the whole model, never a block's last head:
    ``{block: [head, ...]}``, ready for :func:`prune_heads`."""
    heads = [len(s) for s in importance]
    if not 0 <= count <= sum(heads) - len(heads):
        raise ValueError(f"can remove 0 to {sum(heads) - len(heads)} heads (every block keeps one), got {count}")
    order = sorted((float(s[h]), i, h) for i, s in enumerate(importance) for h in range(len(s)))
    left, chosen = list(heads), {}
    for _, i, h in order:
        if sum(len(v) for v in chosen.values()) == count:
            break
        if left[i] > 1:
            chosen.setdefault(i, []).append(h)
            left[i] -= 1
    return {i: sorted(v) for i, v in sorted(chosen.items())}


def prune_heads(model: VisionTransformer, heads: dict) -> VisionTransformer:
    """A new, smaller model without ``heads`` = ``{block: [head indices of that block]}``.

    The model given is not changed. Indices count the block's heads as they are now (after any
    earlier pruning). Its logits equal the original's with those heads gated off (float64, to
    rounding). Raises ``ValueError`` for a block the model does not have, a head index out of
    range or repeated, or every head of a block."""
    c = model.config
    if not isinstance(heads, dict):
        raise TypeError(f"heads must be a dict {{block: [head, ...]}}, got {type(heads).__name__}")
    remove = {}
    for block, idx in heads.items():
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or not 0 <= block < c.depth:
            raise ValueError(f"cannot prune heads of block {block!r}: the model has {c.depth} blocks "
                             f"(0 to {c.depth - 1})")
        n = c.heads_of(int(block))
        idx = list(idx)
        bad = [h for h in idx if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or not 0 <= h < n]
        if bad:
            raise ValueError(f"block {block} has {n} heads (0 to {n - 1}); cannot prune {bad}")
        if len(set(idx)) != len(idx):
            raise ValueError(f"block {block}: head indices repeat in {idx}")
        if len(idx) == n:
            raise ValueError(f"pruning every head of block {block} ({n} of {n}) would leave its attention with "
                             f"nothing; keep at least one head per block")
        remove[int(block)] = set(int(h) for h in idx)
    hs = c.head_size
    sd = model.state_dict()
    counts = []
    for i in range(c.depth):
        n = c.heads_of(i)
        keep = [h for h in range(n) if h not in remove.get(i, ())]
        counts.append(len(keep))
        if len(keep) == n:
            continue
        cols = np.concatenate([np.arange(h * hs, (h + 1) * hs) for h in keep])  # within one of q, k, v
        rows = np.concatenate([cols + part * n * hs for part in range(3)])  # in the fused [q | k | v]
        p = f"blocks.{i}.attn."
        sd[p + "qkv.weight"] = sd[p + "qkv.weight"][rows]
        if p + "qkv.bias" in sd:
            sd[p + "qkv.bias"] = sd[p + "qkv.bias"][rows]
        sd[p + "proj.weight"] = sd[p + "proj.weight"][:, cols]
    config = c.to_dict()
    config["block_heads"] = counts if any(n != c.heads for n in counts) else None
    pruned = VisionTransformer.from_config(config, backend=model.backend, dtype=model.dtype)
    pruned.load_state_dict(sd)
    for name in ("labels", "preprocessing", "precision"):
        if hasattr(model, name):
            setattr(pruned, name, getattr(model, name))
    return pruned
