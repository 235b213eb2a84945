"""Chapter 15: 2D rotary position embedding (RoPE-ViT, Heo et al. 2024).

Chapter 2 added a position vector to every token, once, before the blocks. RoPE adds
nothing: in every block it turns each head's query and key, pair of numbers by pair of
numbers, by an angle that grows with the patch's column and row. Two turned vectors'
dot product then depends on how far apart the two patches are, not on where they are, so
the same weights read a larger grid.

- ``pos_embed="rope_axial"``: fixed frequencies (theta = 100); half of the pairs turn with
  the column, half with the row;
- ``pos_embed="rope_mixed"``: every pair turns along a learned direction of the grid (a
  frequency vector per block, head and pair, ``rope.freqs``), started at theta = 10.

This chapter builds the angle tables, turns q and k, checks the backward by hand (finite
differences) and the offset property, and draws the frequency patterns.

Derivation: docs/rope.md. Run: ``python3 examples/15_rope.py``.
Picture: ``docs/images/15_rope.png``.
"""
from __future__ import annotations

import sys

import _tour
import numpy as np

from tinyvit import VisionTransformer
from tinyvit.layers.rope import (rope_angles_backward, rope_angles_forward, rope_axial_freqs, rope_backward,
                                 rope_forward, rope_mixed_freqs, rope_positions)

GRID = 14  # 224 / 16: ViT-Ti/16's patch grid
HEADS, HS = 3, 64  # ViT-Ti: D = 192 = 3 heads x 64


def finite_difference(f, x, dout, step=1e-6):
    """d/dx of sum(f(x) * dout), coordinate by coordinate (float64)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        keep = x[i]
        x[i] = keep + step
        plus = np.sum(f(x) * dout)
        x[i] = keep - step
        minus = np.sum(f(x) * dout)
        x[i] = keep
        grad[i] = (plus - minus) / (2 * step)
    return grad


def offset_kernel(angles_head: np.ndarray, q: np.ndarray, k: np.ndarray, grid: int) -> np.ndarray:
    """The score between q at the centre patch and k at every patch, after both are turned: ``(grid, grid)``."""
    n = grid * grid
    x = np.stack([np.broadcast_to(q, (n, q.size)), np.broadcast_to(k, (n, k.size))])[:, None]  # (2, 1, Np, hs)
    turned, _ = rope_forward(np.ascontiguousarray(x), angles_head[None], 0)
    centre = (grid // 2) * grid + grid // 2
    return (turned[1, 0] @ turned[0, 0, centre]).reshape(grid, grid)


def main() -> None:
    args = _tour.parse_args(__doc__)
    rng = np.random.default_rng(0)
    failures = []

    _tour.banner("positions and frequencies")
    pos = rope_positions(GRID, GRID)  # (2, Np): column cx, row cy of each patch, row-major
    print(f"rope_positions({GRID}, {GRID}) -> {pos.shape}: patch 15 is at column {pos[0, 15]:.0f}, row {pos[1, 15]:.0f}")
    axial = rope_axial_freqs(HS, 100.0)  # (2, 1, hs/2)
    print(f"axial freqs {axial.shape} (x|y, heads shared, pairs): w_i = 100^(-4i/{HS}), "
          f"{np.round(axial[0, 0, :4], 3).tolist()} ... on x for pairs 0-{HS // 4 - 1}, the same on y for "
          f"pairs {HS // 4}-{HS // 2 - 1}")
    mixed = rope_mixed_freqs(HS, HEADS, 12, 10.0, rng)  # (2, depth, NH, hs/2)
    print(f"mixed freqs {mixed.shape} (x|y, block, head, pair): magnitudes 10^(-4i/{HS}), a random direction per "
          f"block and head; 'rope.freqs' in a rope_mixed model's params")
    m = VisionTransformer(image_size=224, patch_size=16, num_classes=10, dim=HEADS * HS, depth=2, heads=HEADS,
                          mlp_dim=4 * HEADS * HS, pos_embed="rope_mixed")
    print(f"VisionTransformer(pos_embed='rope_mixed', depth=2): params['rope.freqs'] {m.params['rope.freqs'].shape}, "
          f"no 'pos_embed': {'pos_embed' not in m.params}")
    angles_axial, _ = rope_angles_forward(axial, pos)  # (1, Np, hs/2)
    angles_mixed, mixed_cache = rope_angles_forward(mixed[:, 0], pos)  # block 0: (NH, Np, hs/2)
    print(f"angles = cx * fx + cy * fy: axial {angles_axial.shape}, mixed (block 0) {angles_mixed.shape}")

    _tour.banner("turning q and k inside attention")
    B, N = 2, 1 + GRID * GRID
    q = rng.standard_normal((B, HEADS, N, HS))  # (B, NH, N, hs): the class token first
    q_turned, cache = rope_forward(q, angles_mixed, num_prefix=1)
    print(f"rope_forward(q {q.shape}, angles {angles_mixed.shape}, num_prefix=1) -> {q_turned.shape}")
    same = np.array_equal(q_turned[:, :, 0], q[:, :, 0])
    norms = np.abs(np.linalg.norm(q_turned, axis=-1) - np.linalg.norm(q, axis=-1)).max()
    print(f"class token untouched: {same}; every vector keeps its length (a rotation): max change {norms:.1e}")
    if not same or norms > 1e-12:
        failures.append("rotation")

    _tour.banner("the score sees the offset, not the place")
    qv, kv = rng.standard_normal(HS), rng.standard_normal(HS)
    for name, table in (("axial", angles_axial[0]), ("mixed head 0", angles_mixed[0])):
        kernel = offset_kernel(table, qv, kv, GRID)
        # the same offset (+1 column, +1 row) from two different places
        x = np.stack([np.broadcast_to(qv, (GRID * GRID, HS)), np.broadcast_to(kv, (GRID * GRID, HS))])[:, None]
        turned, _ = rope_forward(np.ascontiguousarray(x), table[None], 0)
        a = turned[0, 0, 0] @ turned[1, 0, GRID + 1]  # q at (0, 0), k at (1, 1)
        b = turned[0, 0, 5 * GRID + 7] @ turned[1, 0, 6 * GRID + 8]  # q at (row 5, col 7), k at (6, 8)
        print(f"{name:13s} q.k for offset (+1, +1): from (0,0) {a:+.6f}, from (5,7) {b:+.6f}; "
              f"range over offsets {kernel.min():+.2f} .. {kernel.max():+.2f}")
        if abs(a - b) > 1e-10:
            failures.append(f"offset property ({name})")

    _tour.banner("backward: turn back, and the angles' gradient")
    dout = rng.standard_normal(q_turned.shape)
    dq, dangles = rope_backward(dout, cache)
    dfreqs = rope_angles_backward(dangles, mixed_cache)  # (2, NH, hs/2): block 0's share of d rope.freqs
    print(f"rope_backward(dout {dout.shape}) -> dq {dq.shape} (dout turned by -theta), dangles {dangles.shape}")
    print(f"rope_angles_backward -> dfreqs {dfreqs.shape}: dfx = sum_n cx dtheta, dfy = sum_n cy dtheta")
    small_q = q[:, :, :6].copy()  # (B, NH, 6, hs): class token + 5 patches, a cheap finite-difference check
    small_a = angles_mixed[:, :5].copy()
    small_d = rng.standard_normal(small_q.shape)
    _, c = rope_forward(small_q, small_a, 1)
    g_q, g_a = rope_backward(small_d, c)
    fd_q = finite_difference(lambda v: rope_forward(v, small_a, 1)[0], small_q, small_d)
    fd_a = finite_difference(lambda v: rope_forward(small_q, v, 1)[0], small_a, small_d)
    err_q, err_a = _tour.max_err(g_q, fd_q)[1], _tour.max_err(g_a, fd_a)[1]
    print(f"against central differences (float64): dq {err_q:.1e}, dangles {err_a:.1e} (relative)")
    if max(err_q, err_a) > 1e-7:
        failures.append("backward")

    _tour.banner("drawing the frequency patterns")
    import matplotlib.pyplot as plt

    pairs = (0, 5, 10, HS // 4, HS // 4 + 5, HS // 4 + 10)  # x pairs, then y pairs (axial)
    fig, axes = plt.subplots(3, 6, figsize=(16, 8.4))
    for col, j in enumerate(pairs):
        axes[0, col].imshow(np.cos(angles_axial[0, :, j]).reshape(GRID, GRID), cmap="RdBu", vmin=-1, vmax=1)
        axes[0, col].set_title(f"axial pair {j} ({'x' if j < HS // 4 else 'y'})", fontsize=9)
        axes[1, col].imshow(np.cos(angles_mixed[0, :, j]).reshape(GRID, GRID), cmap="RdBu", vmin=-1, vmax=1)
        axes[1, col].set_title(f"mixed head 0, pair {j}", fontsize=9)
    for col, (name, table) in enumerate([("axial", angles_axial[0])] +
                                        [(f"mixed head {h}", angles_mixed[h]) for h in range(HEADS)]):
        kernel = offset_kernel(table, qv, kv, GRID)
        axes[2, col].imshow(kernel, cmap="viridis")
        axes[2, col].plot(GRID // 2, GRID // 2, "w+", ms=10)
        axes[2, col].set_title(f"{name}: q.k, q at the centre", fontsize=9)
    for ax in axes[2, 1 + HEADS:]:
        ax.axis("off")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("cos(angle) on the grid", fontsize=9)
    axes[2, 0].set_ylabel("score over key position", fontsize=9)
    fig.suptitle(f"2D RoPE on the {GRID} x {GRID} patch grid (hs = {HS}): axial pairs follow x or y, mixed pairs follow "
                 f"a direction per head; bottom: one q and one k content, scored at every offset", fontsize=10)
    fig.tight_layout()
    _tour.save(fig, args, "15_rope.png")

    if failures:
        print(f"FAILED: {failures}")
        sys.exit(1)


if __name__ == "__main__":
    main()
