"""Chapter 10: cheaper attention. FlashAttention's tiles (same numbers, memory linear in the
tokens) and Swin's windows (fewer numbers: each patch attends within its window).

The tutorial's optimisation chapter names attention sparsification; this chapter builds two
answers and measures them:

1. **Flash** (``attn_impl="flash"``): the online softmax walks the keys tile by tile with a
   running row max ``m`` and sum ``l``; the forward keeps only the output and each row's
   logsumexp ``L = m + log l``; the backward recomputes each tile's probabilities from ``L``.
   Shown by hand on one row, then checked equal to plain attention, then the memory that the
   backward needs is measured against the token count.
2. **Windows** (``attn_window=M``, ``attn_shift=True``): patch tokens attend within their
   ``M x M`` window of the patch grid, every second block with the windows shifted by ``M/2``
   and Swin's mask; the class token attends globally (Vision Longformer's global tokens).
   Drawn over the flower photo, with the pairs a token scores, and the FLOPs that remain.

Derivations: docs/flash_attention.md, docs/window_attention.md.
Run: ``python3 examples/10_cheaper_attention.py`` (``--quick``: smaller sizes).
Pictures: ``docs/images/10_flash_memory.png``, ``docs/images/10_windows.png``.
"""
from __future__ import annotations

import math
import sys
import tracemalloc

import _tour
import numpy as np

from tinyvit import VisionTransformer
from tinyvit.benchmark import flops
from tinyvit.gradcheck import check_backward
from tinyvit.gradcheck.cases import select
from tinyvit.layers.attention import attention_backward, attention_forward
from tinyvit.layers.flash_attention import flash_attention_backward, flash_attention_forward
from tinyvit.layers.window_attention import WindowSpec, shift_mask, window_token_index

PATCH, M = 16, 7  # ViT-Ti/16 on a 224 photo: a 14 x 14 grid, Swin's 7 x 7 windows


def kept_bytes(cache) -> int:
    """Bytes of the distinct array buffers a cache keeps alive until the backward (views counted once)."""
    seen, total = set(), 0

    def walk(obj):
        nonlocal total
        if isinstance(obj, np.ndarray):
            base = obj
            while isinstance(base.base, np.ndarray):
                base = base.base
            if id(base) not in seen:
                seen.add(id(base))
                total += base.nbytes
        elif isinstance(obj, tuple):
            for o in obj:
                walk(o)

    walk(cache)
    return total


def peak_bytes(fn) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> None:
    args = _tour.parse_args(__doc__)
    rng = np.random.default_rng(0)
    failures = []

    _tour.banner("the online softmax on one row of scores, tile by tile")
    scores = rng.standard_normal(10) * 3  # one query's scores against N = 10 keys
    values = rng.standard_normal((10, 2))  # (N, hs) with hs = 2
    m, l, acc = -math.inf, 0.0, np.zeros(2)
    for j in range(0, 10, 4):  # key tiles of 4, 4, 2
        tile = scores[j:j + 4]
        m_new = max(m, tile.max())
        p = np.exp(tile - m_new)  # un-normalised, every entry <= 1
        l = l * math.exp(m - m_new) + p.sum()  # what was summed under the old max, rescaled
        acc = acc * math.exp(m - m_new) + p @ values[j:j + 4]
        m = m_new
        print(f"keys {j}-{j + len(tile) - 1}: running max m = {m:.3f}, running sum l = {l:.4f}, acc {acc.shape}")
    soft = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    err = _tour.max_err(acc / l, soft @ values)[0]
    print(f"acc / l vs softmax(scores) @ values: max abs error {err:.1e}; L = m + log l = {m + math.log(l):.4f} "
          f"(logsumexp {np.log(np.exp(scores).sum()):.4f})")
    if err > 1e-12:
        failures.append(f"online softmax: {err:.1e}")

    _tour.banner("flash = plain attention, forward and every gradient (float64)")
    B, N, D, NH = (1, 65, 64, 2) if args.quick else (2, 197, 192, 3)  # N = 197: ViT-Ti/16 at 224
    x = rng.standard_normal((B, N, D))
    w = [rng.standard_normal((3 * D, D)) * 0.1, rng.standard_normal(3 * D) * 0.1, rng.standard_normal((D, D)) * 0.1,
         np.zeros(D)]
    dout = rng.standard_normal((B, N, D))
    out_p, cache_p = attention_forward(x, *w, NH)
    out_f, cache_f = flash_attention_forward(x, *w, NH, 32)
    print(f"x {x.shape}, tiles of 32: plain caches att {cache_p.att.out.shape}; flash caches O "
          f"{cache_f.core.out.shape} and L {cache_f.core.lse.shape}")
    worst = 0.0
    for name, a, b in zip(("out", "dx", "dW_qkv", "db_qkv", "dW_proj", "db_proj"),
                          (out_f, *flash_attention_backward(dout, cache_f)),
                          (out_p, *attention_backward(dout, cache_p))):
        rel = _tour.max_err(a, b)[1]
        worst = max(worst, rel)
        print(f"  {name:8s} {str(a.shape):14s} relative error {rel:.1e}")
    if worst > 1e-12:
        failures.append(f"flash vs plain: {worst:.1e}")

    _tour.banner("memory against tokens: what one attention block keeps for its backward (float32)")
    sizes = (64, 128, 224) if args.quick else (64, 128, 224, 320, 448, 640)
    batch = 2 if args.quick else 8
    rows = []
    for size in sizes:
        n = (size // PATCH) ** 2 + 1
        xs = rng.standard_normal((batch, n, 192)).astype(np.float32)  # ViT-Ti: D = 192, NH = 3
        ws = [(rng.standard_normal(s) * 0.05).astype(np.float32) for s in ((576, 192), (576,), (192, 192), (192,))]
        d = rng.standard_normal((batch, n, 192)).astype(np.float32)
        kept = {"plain": kept_bytes(attention_forward(xs, *ws, 3)[1]),
                "flash": kept_bytes(flash_attention_forward(xs, *ws, 3, 128)[1])}
        peak = {"plain": peak_bytes(lambda: attention_backward(d, attention_forward(xs, *ws, 3)[1])),
                "flash": peak_bytes(lambda: flash_attention_backward(d, flash_attention_forward(xs, *ws, 3, 128)[1]))}
        rows.append((size, n, kept, peak))
        print(f"{size} px, N = {n:4d}: kept plain {kept['plain'] / 2**20:7.1f} MiB, flash {kept['flash'] / 2**20:6.2f} "
              f"MiB; forward+backward peak plain {peak['plain'] / 2**20:7.1f} MiB, flash {peak['flash'] / 2**20:6.1f} "
              f"MiB (batch {batch}; x 12 blocks for what a ViT-Ti step keeps)")
    if rows[-1][2]["flash"] >= rows[-1][2]["plain"]:
        failures.append("flash keeps no less than plain")

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    tokens = [r[1] for r in rows]
    for key, style in (("plain", "o-"), ("flash", "s-")):
        ax[0].plot(tokens, [12 * r[2][key] / 2**20 for r in rows], style, label=f"{key}: kept x 12 blocks")
        ax[1].plot(tokens, [r[3][key] / 2**20 for r in rows], style, label=f"{key}: one block's fwd+bwd peak")
    for a, title in zip(ax, ("what the attention of 12 blocks keeps for the backward",
                             "peak of one attention forward + backward")):
        a.set_xlabel("tokens N (ViT-Ti/16: 224 px = 197, 448 px = 785, 640 px = 1601)")
        a.set_ylabel(f"MiB (batch {batch}, float32)")
        a.set_title(title, fontsize=10)
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle("Plain attention keeps B NH N^2 probabilities; flash keeps B NH N (hs + 1)", fontsize=11)
    _tour.save(fig, args, "10_flash_memory.png")

    _tour.banner("windows over the flower: W-MSA (block 0), SW-MSA shifted by M/2 (block 1)")
    grid = 224 // PATCH
    spec0, spec1 = WindowSpec((grid, grid), 1, M, 0), WindowSpec((grid, grid), 1, M, M // 2)
    model = VisionTransformer(image_size=224, patch_size=PATCH, num_classes=10, dim=48, depth=2, heads=2,
                              mlp_dim=96, attn_window=M, attn_shift=True, dtype="float64")
    image = _tour.photo("flower")
    model.forward(image.transpose(2, 0, 1)[None].astype(np.float64))
    maps = model.attention_maps()  # 2 x (1, NH, 197, 197), zero outside the windows
    print(f"attention maps {[a.shape for a in maps]}; windows {window_token_index(spec0).shape} (nW, M*M); "
          f"shift mask {shift_mask((grid, grid), M, M // 2).shape}")
    token_rc = (6, 6)  # the patch at row 6, column 6: at a window corner, so the shift moves its window
    t = 1 + token_rc[0] * grid + token_rc[1]
    seen = [np.flatnonzero(a[0, 0, t, 1:] > 1e-30) for a in maps]
    print(f"patch {token_rc} (token {t}) scores {len(seen[0])} patches in block 0 and {len(seen[1])} in block 1 "
          f"(+ the class token), out of {grid * grid}")
    if any(len(s) != M * M for s in seen[:1]):
        failures.append("a token sees other than its window")
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    for ax_, spec, title in ((axes[0], spec0, f"block 0: {M}x{M} windows"),
                             (axes[1], spec1, f"block 1: shifted by {M // 2} (one colour per window)")):
        ax_.imshow(image)
        idx = window_token_index(spec) - 1  # (nW, S) patch indices
        colours = plt.cm.tab20(np.linspace(0, 1, len(idx)))
        for wi, toks in enumerate(idx):
            for p in toks:
                r, c = divmod(int(p), grid)
                ax_.add_patch(plt.Rectangle((c * PATCH, r * PATCH), PATCH, PATCH, color=colours[wi], alpha=0.35,
                                            lw=0))
        for k in range(0, grid + 1, M):
            off = spec.shift * PATCH
            ax_.axhline((k * PATCH + off) % 224, color="white", lw=2)  # rolled by -s: borders move to +s
            ax_.axvline((k * PATCH + off) % 224, color="white", lw=2)
        ax_.set_title(title, fontsize=10)
        ax_.axis("off")
    axes[2].imshow(image)
    for s_, colour, label in ((seen[0], "yellow", "block 0"), (seen[1], "cyan", "block 1")):
        for p in s_:
            r, c = divmod(int(p), grid)
            axes[2].add_patch(plt.Rectangle((c * PATCH + 2, r * PATCH + 2), PATCH - 4, PATCH - 4, fill=False,
                                            ec=colour, lw=1.5))
        axes[2].plot([], [], color=colour, label=f"{label}: {len(s_)} patches")
    axes[2].add_patch(plt.Rectangle((token_rc[1] * PATCH, token_rc[0] * PATCH), PATCH, PATCH, color="red", alpha=0.7))
    axes[2].legend(loc="lower right", fontsize=8)
    axes[2].set_title("what the red patch attends to (+ the class token)", fontsize=10)
    axes[2].axis("off")
    fig.suptitle("Swin's windows on a ViT-Ti/16 grid: the shift lets information cross the window borders "
                 "(the wrapped strips are masked apart)", fontsize=11)
    _tour.save(fig, args, "10_windows.png")

    _tour.banner("compute that remains (tinyvit.flops, per image, q k^T + A v over 12 blocks)")
    for size in (224, 448):
        base = dict(flops.PRESETS["vit_ti16"], image_size=size)
        glob = flops.macs_by_layer(base)
        for m_ in (0, 7, 14):
            if m_ and (size // PATCH) % m_:
                continue
            c = dict(base, attn_window=m_)
            by = flops.macs_by_layer(c)
            att = (by["attn_scores"] + by["attn_values"]) / 1e9
            share = att * 1e9 / sum(by.values())
            print(f"{size} px {'global' if not m_ else f'window {m_}':9s}: pairs/head {flops.attention_pairs(c):8,d}, "
                  f"attention {att:5.2f} GMACs ({share:5.1%} of the forward; global "
                  f"{(glob['attn_scores'] + glob['attn_values']) / 1e9:.2f})")

    _tour.banner("the backwards against finite differences and PyTorch (tinyvit gradcheck rows)")
    from tinyvit.backend import get_backend

    for case in select(["flash_core", "window_core", "relative_bias"]):
        report = check_backward(**case.build(get_backend("numpy"), "float64"))
        print(f"{case.name:14s} {'PASS' if report.ok else 'FAIL'}  ({case.about})")
        if not report.ok:
            failures.append(case.name)

    if failures:
        print("FAILED: " + "; ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
