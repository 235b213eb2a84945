"""Chapter 3: one attention head step by step, then multi-head, forward and backward.

The tutorial's section 2.3. For tokens ``x: (B, N, D)``:

    q, k, v = x @ W_q.T, x @ W_k.T, x @ W_v.T        (B, N, hs) each
    scores  = q @ k^T / sqrt(hs)                      (B, N, N): how much token i asks for token j
    att     = softmax(scores) over j                  (B, N, N): each row sums to 1
    y       = att @ v                                 (B, N, hs): a weighted mean of the values

Multi-head does that ``NH`` times on ``hs = D / NH`` channels each and concatenates.
tinyvit's ``attention_forward`` (``tinyvit/layers/attention.py``) does all heads at once from one
fused ``qkv`` weight ``(3D, D)``; here it is written out by hand and compared, and then the
backward is written out by hand too and compared with ``attention_backward`` and with
finite differences.

The weights are random. So that the picture means something, ``W_k = W_q``: then
``scores = (x W_q^T)(x W_q^T)^T`` is a similarity, and a patch attends to patches that look
like it. A trained head learns its own ``W_q`` and ``W_k``; at timm's initialisation
(std 0.02) attention is almost uniform, which this chapter also measures.

Derivation: docs/softmax_attention.md. Run: ``python3 examples/03_attention.py``.
Picture: ``docs/images/03_attention.png``.
"""
from __future__ import annotations

import math

import _tour
import numpy as np

from tinyvit import VisionTransformer
from tinyvit.layers.attention import attention_backward, attention_forward, softmax_backward, softmax_forward
from tinyvit.layers.layernorm import layernorm_forward
from tinyvit.layers.patch_embed import patch_embed_forward

PATCH = 16  # P: a 14 x 14 grid
DIM = 64  # D
HEADS = 4  # NH; hs = 16


def main() -> None:
    args = _tour.parse_args(__doc__)
    rng = np.random.default_rng(0)
    grid = 224 // PATCH

    _tour.banner("tokens: the flower, patched, embedded, normalised")
    image = _tour.photo("flower")  # (224, 224, 3)
    x_img = image.transpose(2, 0, 1)[None].astype(np.float64)  # (1, 3, 224, 224), float64 for the checks
    w_pe = rng.standard_normal((DIM, 3, PATCH, PATCH)) / math.sqrt(3 * PATCH * PATCH)  # (D, C, P, P)
    tokens, _ = patch_embed_forward(x_img, w_pe, np.zeros(DIM))  # (1, 196, 64)
    x, _ = layernorm_forward(tokens, np.ones(DIM), np.zeros(DIM), 1e-6)  # (B, N, D) = (1, 196, 64)
    batch, n_tok, _ = x.shape
    print(f"x (B, N, D) = {x.shape} (no class token here: every token is a patch)")

    _tour.banner("one head, step by step (hs = D)")
    w_q = rng.standard_normal((DIM, DIM)) / math.sqrt(DIM)  # (hs, D)
    w_k = w_q  # see the docstring: similarity attention
    w_v = rng.standard_normal((DIM, DIM)) / math.sqrt(DIM)  # (hs, D)
    q = x @ w_q.T  # (B, N, D) @ (D, hs) -> (B, N, hs)
    k = x @ w_k.T  # (B, N, hs)
    v = x @ w_v.T  # (B, N, hs)
    print(f"q, k, v = x @ W.T                 {q.shape} each")
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(DIM)  # (B, N, hs) @ (B, hs, N) -> (B, N, N)
    print(f"scores = q @ k^T / sqrt(hs)       {scores.shape}   row i: how well token i's query fits every key")
    att, att_cache = softmax_forward(scores)  # (B, N, N)
    print(f"att = softmax(scores, axis=-1)    {att.shape}   rows sum to 1: {np.allclose(att.sum(-1), 1.0)}")
    y = att @ v  # (B, N, N) @ (B, N, hs) -> (B, N, hs)
    print(f"y = att @ v                       {y.shape}   token i's output: a weighted mean of the values")
    qkv_w = np.concatenate([w_q, w_k, w_v])  # (3D, D): tinyvit's fused projection, [q | k | v]
    ours, _ = attention_forward(x, qkv_w, None, np.eye(DIM), None, heads=1)  # proj = identity
    print(f"tinyvit attention_forward(heads=1, proj=I) vs by hand: max abs error {_tour.max_err(ours, y)[0]:.1e}")

    _tour.banner(f"multi-head: NH = {HEADS} heads of hs = {DIM // HEADS}")
    hs = DIM // HEADS
    w_qkv = rng.standard_normal((3, DIM, DIM)) / math.sqrt(DIM)  # [W_q, W_k, W_v], each (D, D)
    w_qkv[1] = w_qkv[0]  # W_k = W_q again, head by head
    proj_w = rng.standard_normal((DIM, DIM)) / math.sqrt(DIM)  # (D, D)
    proj_b = np.zeros(DIM)
    heads_out, head_maps = [], []
    for h in range(HEADS):
        rows = slice(h * hs, (h + 1) * hs)  # head h owns channels [h*hs, (h+1)*hs) of q, k and v
        qh, kh, vh = (x @ w_qkv[i, rows].T for i in range(3))  # (B, N, D) @ (D, hs) -> (B, N, hs)
        att_h, _ = softmax_forward(qh @ kh.swapaxes(-1, -2) / math.sqrt(hs))  # (B, N, N)
        heads_out.append(att_h @ vh)  # (B, N, hs)
        head_maps.append(att_h[0])
    y_multi = np.concatenate(heads_out, axis=-1) @ proj_w.T + proj_b  # (B, N, NH*hs) = (B, N, D) -> (B, N, D)
    out, _ = attention_forward(x, w_qkv.reshape(3 * DIM, DIM), None, proj_w, proj_b, heads=HEADS)
    print(f"by hand: {HEADS} x (B, N, hs) -> concatenate -> (B, N, D) -> proj -> {y_multi.shape}")
    print(f"tinyvit: qkv (B, N, 3D) -> reshape (B, N, 3, NH, hs) -> q, k, v (B, NH, N, hs) -> att (B, NH, N, N) "
          f"-> {out.shape}")
    print(f"  max abs error {_tour.max_err(out, y_multi)[0]:.1e}; "
          f"the attention probabilities are (B, NH, N, N) = {(batch, HEADS, n_tok, n_tok)}")

    _tour.banner("the backward, by hand (one head, the forward above read bottom-up)")
    dy = rng.standard_normal(y.shape)  # (B, N, hs): some upstream gradient dL/dy
    # y = att @ v
    datt = dy @ v.swapaxes(-1, -2)  # (B, N, hs) @ (B, hs, N) -> (B, N, N)
    dv = att.swapaxes(-1, -2) @ dy  # (B, N, N) @ (B, N, hs) -> (B, N, hs)
    # att = softmax(scores): per row, dscores = att * (datt - sum_j(datt * att))
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))  # (B, N, N)
    print(f"dscores by hand vs tinyvit softmax_backward: "
          f"{_tour.max_err(dscores, softmax_backward(datt, att_cache))[0]:.1e}")
    # scores = q @ k^T / sqrt(hs)
    dq = dscores @ k / math.sqrt(DIM)  # (B, N, N) @ (B, N, hs) -> (B, N, hs)
    dk = dscores.swapaxes(-1, -2) @ q / math.sqrt(DIM)  # (B, N, N) @ (B, N, hs) -> (B, N, hs)
    # q = x @ W_q.T (and k, v): a linear layer each
    dw_q = dq.reshape(-1, DIM).T @ x.reshape(-1, DIM)  # (hs, B*N) @ (B*N, D) -> (hs, D)
    dw_k = dk.reshape(-1, DIM).T @ x.reshape(-1, DIM)
    dw_v = dv.reshape(-1, DIM).T @ x.reshape(-1, DIM)
    dx = dq @ w_q + dk @ w_k + dv @ w_v  # (B, N, hs) @ (hs, D) -> (B, N, D), three paths into x, added
    _, one_cache = attention_forward(x, qkv_w, None, np.eye(DIM), None, heads=1)
    dx_t, dqkv_w, _, _, _ = attention_backward(dy, one_cache)
    print(f"dx by hand vs attention_backward: {_tour.max_err(dx, dx_t)[0]:.1e}; "
          f"d[W_q|W_k|W_v]: {_tour.max_err(np.concatenate([dw_q, dw_k, dw_v]), dqkv_w)[0]:.1e}")
    # a finite difference on one input number, in float64: L = sum(y * dy)
    where, eps = (0, 17, 5), 1e-5

    def loss(x_):
        out_, _ = attention_forward(x_, qkv_w, None, np.eye(DIM), None, heads=1)
        return float((out_ * dy).sum())

    x_plus, x_minus = x.copy(), x.copy()
    x_plus[where] += eps
    x_minus[where] -= eps
    numeric = (loss(x_plus) - loss(x_minus)) / (2 * eps)  # central difference, error O(eps^2)
    print(f"finite difference dL/dx[0, 17, 5] = {numeric:.9f}, backward {dx[where]:.9f} (L = sum(y * dy), float64)")

    _tour.banner("at timm's initialisation (std 0.02) attention is almost uniform")
    m = VisionTransformer(image_size=224, patch_size=PATCH, num_classes=10, dim=DIM, depth=2, heads=HEADS,
                          mlp_dim=2 * DIM, seed=0)
    m.forward(x_img.astype(np.float32))
    maps = m.attention_maps()  # [(B, NH, N, N)] per block, N = 197 with the class token
    for b_i, a in enumerate(maps):
        entropy = -(a * np.log(a)).sum(-1).mean()
        print(f"block {b_i}: attention maps {a.shape}, mean row entropy {entropy:.3f} nats "
              f"(uniform over {a.shape[-1]} tokens: {math.log(a.shape[-1]):.3f})")

    import matplotlib.pyplot as plt

    queries = {"petal": (7, 4), "centre": (6, 7), "background": (1, 1)}  # (row, column) on the grid
    fig, axes = plt.subplots(2, 4, figsize=(15, 7.6))
    ax = axes[0, 0]
    ax.imshow(image)
    for name, (r, c) in queries.items():
        ax.add_patch(plt.Rectangle((c * PATCH, r * PATCH), PATCH, PATCH, fill=False, ec="red", lw=1.5))
        ax.text(c * PATCH, r * PATCH - 2, name, color="red", fontsize=8)
    ax.set_title("query patches", fontsize=9)
    ax.axis("off")
    for ax, (name, (r, c)) in zip(axes[0, 1:], queries.items()):
        row = att[0, r * grid + c].reshape(grid, grid)  # (14, 14): where this query's probability goes
        ax.imshow(image)
        ax.imshow(np.kron(row / row.max(), np.ones((PATCH, PATCH))), cmap="inferno", alpha=0.65)
        ax.add_patch(plt.Rectangle((c * PATCH, r * PATCH), PATCH, PATCH, fill=False, ec="cyan", lw=1.5))
        ax.set_title(f"one head: att[{name} patch, :] on the grid", fontsize=9)
        ax.axis("off")
    for h, ax in enumerate(axes[1]):
        ax.imshow(head_maps[h], cmap="viridis", interpolation="nearest")
        ax.set_title(f"head {h}: att (N, N) = (196, 196)", fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
    fig.suptitle("Self-attention with W_k = W_q (random): a patch attends to patches that look like it", fontsize=11)
    _tour.save(fig, args, "03_attention.png")


if __name__ == "__main__":
    main()
