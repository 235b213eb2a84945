"""``tinyvit bench --fewer``: fewer tokens and fewer heads, as images/s against the plain model.

Per model (ViT-Ti/S/B at 224 by default), one process, every variant timed interleaved
(``timing.time_calls``) over the same weights and batch:

- **inference** (forward, no caches kept): the plain model, ToMe at several ``r`` (checked
  first: ``r = 0`` gives the plain logits bit for bit), half the heads of every block pruned
  (checked first: equal to the plain model with those heads gated off), and PyTorch eager on
  the plain model (the house's yardstick);
- **training step** (forward, loss, backward): plain, ToMe, and PatchDropout at rate 0.5.

Rows give median/min/max seconds, images/s and the ratio to the plain model's images/s, next to
ToMe's published ratio where the paper gives one (docs/tome.md).
"""
from __future__ import annotations

import numpy as np

from ..layers.loss import softmax_cross_entropy
from ..layers.tome import tome_max_r
from ..model import VisionTransformer
from . import timing, torch_ref
from .models import build_config

# ToMe (Bolya et al., ICLR 2023): off the shelf on timm's AugReg ViT-B/16 (V100, images/s), and the GFLOPs
# of ToMe-trained DeiT-Ti/S at 224 (the paper's DeiT table); FLOPs, not time, for those two
PUBLISHED = {("vit_b16", 13): "309 -> 511 img/s = 1.65x (84.57 -> 82.60 top-1), V100",
             ("vit_ti16", 8): "DeiT-Ti 1.3 -> 0.9 GFLOPs (1.4x fewer), 71.7% top-1",
             ("vit_ti16", 12): "DeiT-Ti 1.3 -> 0.8 GFLOPs (1.6x fewer), 71.4% top-1",
             ("vit_s16", 8): "DeiT-S 4.6 -> 3.4 GFLOPs (1.35x fewer), 79.7% top-1",
             ("vit_s16", 13): "DeiT-S 4.6 -> 2.7 GFLOPs (1.7x fewer), 79.4% top-1"}


def default_rs(largest: int) -> tuple:
    """0, the r values ToMe's paper reports (8, 12, 13) where they fit, and the largest."""
    return tuple(sorted({0, largest} | {r for r in (8, 12, 13) if r <= largest} | ({largest // 2} if largest < 8 else set())))


def fewer_sweep(model, batch: int, dtype: str, repeats: int, rs=None, drop: float = 0.5, torch: bool = True,
                on_model=None) -> list:
    """Rows for one model preset (or config dict); see the module docstring."""
    base = build_config(model)
    name = model if isinstance(model, str) else "custom"
    largest = tome_max_r(base.num_tokens, base.num_prefix_tokens, base.depth)
    rs = tuple(rs) if rs else default_rs(largest)
    bad = [r for r in rs if not 0 <= r <= largest]
    if bad:
        raise ValueError(f"--tome-r {bad}: the largest r for {name} ({base.num_tokens} tokens, {base.depth} blocks) "
                         f"is {largest}")
    rng = np.random.default_rng(0)
    h, w = base.image_size
    x = rng.standard_normal((batch, base.channels, h, w)).astype(dtype)
    y = rng.integers(0, base.num_classes, size=batch)
    plain = VisionTransformer.from_config(base, backend="numpy", dtype=dtype, seed=0)
    weights = plain.state_dict()

    def variant(**over):
        m = VisionTransformer.from_config({**base.to_dict(), **over}, backend="numpy", dtype=dtype, seed=0)
        m.load_state_dict(weights)
        return m

    tome = {r: (plain if r == 0 else variant(tome_r=r)) for r in rs}
    if 0 in tome and not np.array_equal(variant(tome_r=0).forward(x, keep_cache=False), plain.forward(x)):
        raise RuntimeError("ToMe with r = 0 differs from the plain model")
    from ..pruning import prune_heads
    half = {i: list(range(base.heads // 2)) for i in range(base.depth)} if base.heads > 1 else {}
    pruned = prune_heads(plain, half) if half else None
    if pruned is not None:
        plain.set_head_gates({i: [0.0] * (base.heads // 2) + [1.0] * (base.heads - base.heads // 2)
                              for i in range(base.depth)})
        gated = plain.forward(x, keep_cache=False)
        plain.set_head_gates(None)
        err = float(np.max(np.abs(pruned.forward(x, keep_cache=False) - gated)) / max(np.max(np.abs(gated)), 1e-30))
        if err > (1e-4 if dtype == "float32" else 1e-12):
            raise RuntimeError(f"pruned model differs from the gated one: {err:.2e}")
    dropped = variant(patch_drop_rate=drop)

    def infer(m):
        return lambda: m.forward(x, keep_cache=False)

    def train(m):
        def step():
            logits = m.forward(x, train=True)
            _, d = softmax_cross_entropy(logits, y)
            m.backward(d, keep_cache=False)
        return step

    fns = {("inference", f"ToMe r={r}" if r else "plain"): infer(m) for r, m in tome.items()}
    if pruned is not None:
        fns[("inference", f"heads pruned: {base.heads - base.heads // 2} of {base.heads} kept per block")] = \
            infer(pruned)
    if torch:
        try:
            t = torch_ref.import_torch()
            params = torch_ref.torch_params(weights, t, "cpu", dtype)
            xt = t.tensor(x)

            def torch_infer():
                with t.no_grad():
                    torch_ref.vit_forward(xt, params, base, t)
            fns[("inference", "PyTorch eager (plain)")] = torch_infer
        except (ImportError, RuntimeError):
            pass
    fns[("training step", "plain")] = train(plain)
    top = max(rs)
    if top:
        fns[("training step", f"ToMe r={top}")] = train(tome[top])
    fns[("training step", f"PatchDropout {drop}")] = train(dropped)
    times = timing.time_calls(fns, repeats, warmup=1)
    rows = []
    for (kind, label), t in times.items():
        ref = times[(kind, "plain")].median
        r = int(label.split("=")[1]) if label.startswith("ToMe") else 0
        tokens = base.num_tokens if not label.startswith("ToMe") else base.num_tokens - base.depth * r
        if label.startswith("PatchDropout"):  # every block sees the prefix and the kept patches
            tokens = base.num_prefix_tokens + max(1, int(base.num_patches * (1.0 - drop)))
        rows.append({"model": name, "batch": batch, "kind": kind, "variant": label, **t.to_dict(),
                     "images_per_s": batch / t.median, "vs_plain": ref / t.median,
                     "tokens_after_last_block": tokens, "published": PUBLISHED.get((name, r), "")})
    if on_model is not None:
        on_model(rows)
    return rows


def fewer_table(rows) -> str:
    lines = ["| model | batch | kind | variant | median (min-max) | images/s | vs plain | tokens at the end | "
             "ToMe paper |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['kind']} | {r['variant']} | {r['median_s'] * 1e3:.1f} ms "
                     f"({r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f}) | {r['images_per_s']:.1f} | "
                     f"{r['vs_plain']:.2f}x | {r['tokens_after_last_block']} | {r['published'] or '—'} |")
    return "\n".join(lines)
