"""Chapter 1: an image cut into patches, the patch vectors, and the patch embedding.

The tutorial's section 2.1: ``(B, 3, 224, 224) -> (B, 196, 768) -> (B, 196, D)``.

- patching (``tinyvit/layers/patch_embed.py: patchify_forward``) only moves numbers: 224 / 16 = 14
  patches a side, 14 * 14 = 196 patches, each 3 * 16 * 16 = 768 numbers, flattened ``(c p1 p2)``;
- the patch embedding is one linear map applied to every patch, ``(768,) -> (D,)``, the same
  as a ``Conv2d(3, D, kernel_size=16, stride=16)`` (chapter 0 checks that against PyTorch);
- its backward is the linear layer's backward, then patching undone (``unpatchify``).

Derivation: docs/patching.md. Run: ``python3 examples/01_patches.py``.
Picture: ``docs/images/01_patches.png``.
"""
from __future__ import annotations

import _tour
import numpy as np

from tinyvit.layers.patch_embed import patch_embed_backward, patch_embed_forward, patchify_forward, unpatchify

PATCH = 16  # P
DIM = 192  # D: ViT-Tiny's width


def main() -> None:
    args = _tour.parse_args(__doc__)
    rng = np.random.default_rng(0)

    _tour.banner("images")
    photos = np.stack([_tour.photo("china"), _tour.photo("flower")])  # (B, H, W, C) = (2, 224, 224, 3)
    x = np.ascontiguousarray(photos.transpose(0, 3, 1, 2))  # (B, C, H, W) = (2, 3, 224, 224), channels first
    print(f"x (B, C, H, W)                      {x.shape} {x.dtype}")

    _tour.banner("patching: (B, C, H, W) -> (B, Np, C*P*P)")
    patches, _ = patchify_forward(x, PATCH)  # (2, 196, 768)
    grid_h, grid_w = x.shape[2] // PATCH, x.shape[3] // PATCH  # 14 x 14
    print(f"P = {PATCH}: grid {grid_h} x {grid_w} = Np = {grid_h * grid_w} patches of C*P*P = 3*{PATCH}*{PATCH} = "
          f"{3 * PATCH * PATCH} numbers")
    print(f"patches (B, Np, C*P*P)              {patches.shape}")
    row, col = 5, 7
    index = row * grid_w + col  # patches are numbered row by row
    block = x[0, :, row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH]  # (C, P, P)
    same = np.array_equal(patches[0, index], block.reshape(-1))
    print(f"patch {index} = grid row {row}, column {col} = x[0, :, {row * PATCH}:{(row + 1) * PATCH}, "
          f"{col * PATCH}:{(col + 1) * PATCH}].reshape(-1): {same}")
    print(f"its 768 numbers: [0:256] red, [256:512] green, [512:768] blue, each a 16x16 block row by row (c p1 p2)")
    back = unpatchify(patches, grid_h, grid_w, PATCH)  # (2, 3, 224, 224)
    print(f"unpatchify(patches) == x: {np.array_equal(back, x)} "
          f"(patching only moves numbers, so its backward is its inverse)")

    _tour.banner("patch embedding: one Linear(C*P*P -> D) per patch, = Conv2d(C, D, P, stride=P)")
    bound = 1.0 / np.sqrt(3 * PATCH * PATCH)  # PyTorch's Conv2d default init, as tinyvit's
    w = rng.uniform(-bound, bound, (DIM, 3, PATCH, PATCH)).astype(np.float32)  # (D, C, P, P)
    b = rng.uniform(-bound, bound, DIM).astype(np.float32)  # (D,)
    tokens, cache = patch_embed_forward(x, w, b)  # (2, 196, 192)
    print(f"w (D, C, P, P)                      {w.shape}  -> reshaped (D, C*P*P) = {(DIM, 3 * PATCH * PATCH)}")
    print(f"tokens = patches @ w.T + b (B, Np, D) {tokens.shape}")
    by_hand = patches @ w.reshape(DIM, -1).T + b  # (B, Np, 768) @ (768, D) -> (B, Np, D)
    print(f"  = patches @ w.reshape(D, -1).T + b by hand: max abs error {_tour.max_err(tokens, by_hand)[0]:.1e}")

    _tour.banner("backward: dtokens (B, Np, D) -> dx (B, C, H, W), dw (D, C, P, P), db (D,)")
    dtokens = rng.standard_normal(tokens.shape).astype(np.float32)  # (2, 196, 192): some upstream gradient
    dx, dw, db = patch_embed_backward(dtokens, cache)
    print(f"dx {dx.shape}  dw {dw.shape}  db {db.shape}")
    dpatches = dtokens @ w.reshape(DIM, -1)  # (B, Np, D) @ (D, 768) -> (B, Np, 768): the linear's dx
    dx_by_hand = unpatchify(dpatches, grid_h, grid_w, PATCH)  # (B, C, H, W)
    print(f"dx == unpatchify(dtokens @ w_2d): {np.allclose(dx, dx_by_hand, atol=1e-6)}; "
          f"dw == sum over (B, Np) of dtokens^T patches: "
          f"{np.allclose(dw.reshape(DIM, -1), dtokens.reshape(-1, DIM).T @ patches.reshape(-1, 768), atol=1e-3)}")

    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 4.6))
    ax = fig.add_subplot(1, 3, 1)
    ax.imshow(photos[0])
    for k in range(1, grid_h):
        ax.axhline(k * PATCH - 0.5, color="white", lw=0.6)
        ax.axvline(k * PATCH - 0.5, color="white", lw=0.6)
    for i in range(grid_h):
        for j in range(grid_w):
            ax.text(j * PATCH + PATCH / 2, i * PATCH + PATCH / 2, str(i * grid_w + j), color="yellow",
                    fontsize=4.5, ha="center", va="center")
    ax.add_patch(plt.Rectangle((col * PATCH - 0.5, row * PATCH - 0.5), PATCH, PATCH, fill=False, ec="red", lw=1.5))
    ax.set_title(f"(3, 224, 224) cut into 14 x 14 = 196 patches of 16 x 16\n(patch {index} in red)", fontsize=9)
    ax.axis("off")

    ax = fig.add_subplot(1, 3, 2)
    ax.imshow(patches[0], aspect="auto", cmap="gray", interpolation="nearest")
    for cut in (256, 512):
        ax.axvline(cut - 0.5, color="red", lw=0.8)
    ax.axhline(index, color="red", lw=0.5)
    ax.set_xticks([128, 384, 640], ["red (c=0)", "green (c=1)", "blue (c=2)"])
    ax.set_ylabel("patch (Np = 196)")
    ax.set_title("patches (Np, C*P*P) = (196, 768): one row per patch", fontsize=9)

    ax = fig.add_subplot(1, 3, 3)
    ax.imshow(tokens[0], aspect="auto", cmap="RdBu_r", interpolation="nearest")
    ax.set_xlabel("D = 192")
    ax.set_ylabel("token (Np = 196)")
    ax.set_title("tokens = patches @ W.T + b: (196, 192)\n(random W: no meaning yet, only shape)", fontsize=9)
    _tour.save(fig, args, "01_patches.png")


if __name__ == "__main__":
    main()
