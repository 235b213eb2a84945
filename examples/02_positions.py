"""Chapter 2: the class token and the position embeddings.

The tutorial's sections 2.2 and 3: ``(B, Np, D) -> (B, 1 + Np, D)`` with a class token in
front, then ``+ pos_embed (1, N, D)``. Attention alone cannot tell where a patch came from
(shuffle the patches and the outputs shuffle the same way), so each position gets a vector
added. Three kinds, all in ``tinyvit/layers/tokens.py``:

- 1D sinusoidal (the Transformer paper, the tutorial's ``PositionalEncoding``): the token
  index 0..N-1 is the position, so the grid is read as one long line;
- 2D sin-cos (MAE, MoCo v3): half the channels encode the row, half the column;
- learned (the ViT paper): a parameter, random at first (std 0.02), trained like any weight.

The picture draws, for every patch position, its cosine similarity to every other position,
laid out on the 14 x 14 patch grid (as figure 7 of the ViT paper does for learned embeddings).

Derivation: docs/tokens.md. Run: ``python3 examples/02_positions.py``.
Picture: ``docs/images/02_positions.png``.
"""
from __future__ import annotations

import _tour
import numpy as np

from tinyvit import VisionTransformer
from tinyvit.layers.tokens import (add_pos_embed_backward, add_pos_embed_forward, fixed_pos_embed, prepend_tokens_backward,
                            prepend_tokens_forward)

GRID = 14  # 224 / 16
DIM = 192  # D


def cosine_mosaic(table: np.ndarray, grid: int) -> np.ndarray:
    """``table: (Np, D)`` -> a ``(grid*(grid+1), grid*(grid+1))`` picture: block (i, j) is the
    cosine similarity of patch (i, j) to every patch, drawn on the grid and scaled to [0, 1]
    within the block (as the ViT paper's figure 7 does), NaN gaps between blocks."""
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)  # (Np, D)
    sim = unit @ unit.T  # (Np, D) @ (D, Np) -> (Np, Np)
    cell = grid + 1
    mosaic = np.full((grid * cell, grid * cell), np.nan)
    for p in range(grid * grid):
        i, j = divmod(p, grid)
        block = sim[p].reshape(grid, grid)  # (grid, grid)
        mosaic[i * cell : i * cell + grid, j * cell : j * cell + grid] = (block - block.min()) / np.ptp(block)
    return mosaic


def main() -> None:
    args = _tour.parse_args(__doc__)
    rng = np.random.default_rng(0)

    _tour.banner("class token: (B, Np, D) -> (B, 1 + Np, D)")
    x = rng.standard_normal((2, GRID * GRID, DIM)).astype(np.float32)  # (B, Np, D): patch embeddings (chapter 1)
    cls_token = (rng.standard_normal((1, 1, DIM)) * 1e-6).astype(np.float32)  # (1, 1, D), timm's init
    tokens, prefix_cache = prepend_tokens_forward(x, cls_token)  # (2, 197, 192)
    print(f"patch tokens {x.shape} + cls_token {cls_token.shape} -> tokens {tokens.shape}: "
          f"N = 1 + Np = {tokens.shape[1]}")
    print("the class token is the same vector for every image; it holds no pixel, and after the blocks the head reads")
    print("only it: attention is how it gathers the image.")
    dtokens = rng.standard_normal(tokens.shape).astype(np.float32)  # (B, N, D)
    dx, dcls = prepend_tokens_backward(dtokens, prefix_cache)
    print(f"backward: dtokens {dtokens.shape} -> dx {dx.shape} (the patch rows) and dcls {dcls.shape} = "
          f"dtokens[:, 0] summed over the batch: {np.allclose(dcls[0, 0], dtokens[:, 0].sum(axis=0))}")

    _tour.banner("position embeddings: tokens + pos_embed (1, N, D)")
    tables = {
        "1D sin-cos (token index)": fixed_pos_embed("sincos1d", GRID, GRID, DIM, num_prefix=1),  # (1, 197, 192)
        "2D sin-cos (row, column)": fixed_pos_embed("sincos2d", GRID, GRID, DIM, num_prefix=1),  # (1, 197, 192)
        "learned, at initialisation": VisionTransformer(
            image_size=224, patch_size=16, num_classes=10, dim=DIM, depth=1, heads=3, mlp_dim=4 * DIM,
            seed=0).state_dict()["pos_embed"],  # (1, 197, 192): trunc-normal, std 0.02
    }
    for name, table in tables.items():
        print(f"{name:28s} pos_embed {table.shape}, |row| mean {np.linalg.norm(table[0, 1:], axis=1).mean():.2f}")
    pos = tables["2D sin-cos (row, column)"].astype(np.float32)
    out, _ = add_pos_embed_forward(tokens, pos)  # (2, 197, 192)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dtok, dpos = add_pos_embed_backward(dout)
    print(f"tokens {tokens.shape} + pos_embed {pos.shape} -> {out.shape}; backward: dtokens = dout {dtok.shape}, "
          f"dpos_embed = dout summed over the batch {dpos.shape}")
    print("(fixed tables get no gradient: VisionTransformer(pos_embed='sincos2d') has no 'pos_embed' key in params)")
    m = VisionTransformer(image_size=32, patch_size=8, num_classes=10, dim=16, depth=1, heads=2, mlp_dim=32,
                          pos_embed="sincos2d")
    print(f"  'pos_embed' in params: {'pos_embed' in m.params}")

    _tour.banner("cosine similarity of each patch position to every other")
    sims = {}
    for name, table in tables.items():
        patch_rows = table[0, 1:]  # (Np, D): skip the class token's row
        unit = patch_rows / np.linalg.norm(patch_rows, axis=1, keepdims=True)
        sim = unit @ unit.T  # (Np, Np)
        sims[name] = sim
        right, below = sim[GRID * 7 + 7, GRID * 7 + 8], sim[GRID * 7 + 7, GRID * 8 + 7]
        print(f"{name:28s} patch (7,7) vs (7,8) right: {right:+.2f}   vs (8,7) below: {below:+.2f}   "
              f"vs (0,0): {sim[GRID * 7 + 7, 0]:+.2f}")
    print("1D: the right neighbour is close, the one below (14 tokens away) much less: the code sees a line,")
    print("    not a grid.")
    print("2D: right and below are equally close. Learned: noise until trained (ViT's trained ones look like 2D).")

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 6.6))
    for ax, (name, table) in zip(axes, tables.items()):
        image = ax.imshow(cosine_mosaic(table[0, 1:], GRID), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}\nblock (i, j): similarity of patch (i, j) to every patch", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity, scaled to [0, 1] within each block")
    fig.suptitle("Position embeddings on the 14 x 14 patch grid (D = 192)", fontsize=11)
    _tour.save(fig, args, "02_positions.png")


if __name__ == "__main__":
    main()
