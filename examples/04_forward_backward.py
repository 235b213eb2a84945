"""Chapter 4: the whole model, forward and backward, next to PyTorch.

The tutorial's section 2.2 builds a ViT from PyTorch modules and lets autograd do the
backward. tinyvit's ``VisionTransformer`` (``tinyvit/model.py``) is a flat script over the
layers: the forward keeps each layer's cache, the backward walks the caches in reverse.
Here the same weights go into a PyTorch ViT made of PyTorch's own modules (``nn.Conv2d``,
``nn.TransformerEncoderLayer(norm_first=True)``, ``nn.LayerNorm``, ``nn.Linear``), both run
one training step's forward and backward in float64, and every gradient is compared.

Derivations: docs/model.md (the backward walk), and one page per layer in docs/.
Run: ``python3 examples/04_forward_backward.py``.
Picture: ``docs/images/04_gradient_errors.png``.
"""
from __future__ import annotations

import _tour
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyvit import VisionTransformer, softmax_cross_entropy
from tinyvit.layers.block import BLOCK_KEYS, block_forward
from tinyvit.layers.head import token_pool_forward
from tinyvit.layers.layernorm import layernorm_forward
from tinyvit.layers.linear import linear_forward
from tinyvit.layers.patch_embed import patch_embed_forward
from tinyvit.layers.tokens import add_pos_embed_forward, prepend_tokens_forward

CONFIG = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64)


class TorchViT(nn.Module):
    """A pre-norm ViT from PyTorch modules (what timm's ViT computes), dropout off."""

    def __init__(self, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, eps=1e-6):
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout=0.0, activation="gelu", layer_norm_eps=eps,
                                       batch_first=True, norm_first=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)  # (B, D, H/P, W/P) -> (B, Np, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N, D)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)  # (B, N, D)
        return self.head(self.norm(x)[:, 0])  # (B, K)


def torch_name(key: str) -> str:
    """timm's key (tinyvit's) -> this PyTorch model's parameter name."""
    renames = {"attn.qkv.": "self_attn.in_proj_", "attn.proj.": "self_attn.out_proj.", "mlp.fc1.": "linear1.",
               "mlp.fc2.": "linear2.", "patch_embed.proj.": "patch_embed."}
    for old, new in renames.items():
        if old in key:
            return key.replace(old, new)  # blocks.0.attn.qkv.weight -> blocks.0.self_attn.in_proj_weight
    return key


def walk_forward(m: VisionTransformer, x, logits) -> None:
    """The forward of ``m.forward`` written out with the layer functions, printing each shape
    (what ``tinyvit/model.py``'s ``_forward`` does, without dropout and the caches' bookkeeping)."""
    p, c = m.params, m.config

    def show(step: str, shape, letters: str) -> None:
        print(f"  {step:36s} -> {str(tuple(shape)):16s} {letters}")

    print(f"the forward, layer by layer, from x {x.shape}:")
    h, _ = patch_embed_forward(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"])
    show("patch_embed_forward", h.shape, "(B, Np, D)")
    h, _ = prepend_tokens_forward(h, p["cls_token"])
    show("prepend_tokens_forward (class token)", h.shape, "(B, N, D)")
    h, _ = add_pos_embed_forward(h, p["pos_embed"])
    show("add_pos_embed_forward", h.shape, "(B, N, D)")
    for i in range(c.depth):
        block = {k: p[f"blocks.{i}.{k}"] for k in BLOCK_KEYS}
        h, _ = block_forward(h, block, c.heads, c.layer_norm_eps, norm_first=True)
        show(f"block_forward (block {i})", h.shape, f"(B, N, D); inside: q, k, v (B, NH, N, hs) = "
             f"{(x.shape[0], c.heads, c.num_tokens, c.dim // c.heads)}, att (B, NH, N, N)")
    h, _ = layernorm_forward(h, p["norm.weight"], p["norm.bias"], c.layer_norm_eps)
    show("layernorm_forward (norm)", h.shape, "(B, N, D)")
    v, _ = token_pool_forward(h, 0)
    show("token_pool_forward (class token)", v.shape, "(B, D)")
    out, _ = linear_forward(v, p["head.weight"], p["head.bias"])
    show("linear_forward (head)", out.shape, f"(B, K); equals m.forward(x): {np.allclose(out, logits, atol=1e-12)}")


def main() -> None:
    args = _tour.parse_args(__doc__)

    _tour.banner("inputs: the two photos at 32 x 32, two labels")
    photos = np.stack([_tour.photo("china"), _tour.photo("flower")])  # (2, 224, 224, 3)
    small = photos[:, :224, :224].reshape(2, 32, 7, 32, 7, 3).mean(axis=(2, 4))  # 7x7 box filter -> (2, 32, 32, 3)
    x = np.ascontiguousarray(small.transpose(0, 3, 1, 2), dtype=np.float64)  # (B, C, H, W) = (2, 3, 32, 32)
    y = np.array([3, 7])  # (B,): any class indices
    print(f"x {x.shape}, y {y.tolist()}")

    _tour.banner("tinyvit: forward, loss, backward (float64)")
    m = VisionTransformer(**CONFIG, dtype="float64", seed=0)
    c = m.config
    print(f"config: P={c.patch_size} -> Np={c.num_patches}, N={c.num_tokens}, D={c.dim}, depth={c.depth}, "
          f"NH={c.heads}, hs={c.dim // c.heads}, F={c.mlp_dim}, K={c.num_classes}; {m.num_params():,} parameters")
    logits = m.forward(x)  # (B, K)
    walk_forward(m, x, logits)
    loss, dlogits = softmax_cross_entropy(logits, y)  # scalar, (B, K)
    dx = m.backward(dlogits)  # (B, C, H, W); fills m.grads
    print(f"logits {logits.shape}, loss {float(loss):.6f}, dlogits {dlogits.shape}, dx {dx.shape}, "
          f"{len(m.grads)} gradients")

    _tour.banner("PyTorch: the same weights, autograd")
    ref = TorchViT(**CONFIG).double()
    sd = {torch_name(k): torch.tensor(v) for k, v in m.state_dict().items()}
    ref.load_state_dict(sd)  # strict: every name must match, both ways
    x_t = torch.tensor(x, requires_grad=True)
    logits_t = ref(x_t)
    loss_t = F.cross_entropy(logits_t, torch.tensor(y))
    loss_t.backward()
    torch_grads = dict(ref.named_parameters())
    print(f"logits: max abs error {_tour.max_err(logits, logits_t.detach().numpy())[0]:.1e}; "
          f"loss {loss_t.item():.6f} (error {abs(float(loss) - loss_t.item()):.1e})")

    _tour.banner("every gradient: max abs error, and relative to max |PyTorch gradient|")
    names, rel_errors = [], []
    print(f"{'gradient':32s} {'shape':>16s} {'max abs err':>12s} {'relative':>10s}")
    for key, g in list(m.grads.items()) + [("x (the image)", dx)]:
        g_t = x_t.grad if key == "x (the image)" else torch_grads[torch_name(key)].grad
        abs_err, rel_err = _tour.max_err(g, g_t.numpy())
        names.append(key)
        rel_errors.append(max(rel_err, 1e-18))
        print(f"{key:32s} {str(tuple(g.shape)):>16s} {abs_err:12.1e} {rel_err:10.1e}")
    worst = max(rel_errors)
    print(f"worst relative error {worst:.1e} (float64 round-off is about 1e-16 per operation)")
    if worst > 1e-10:
        raise SystemExit(f"a gradient disagrees with PyTorch: relative error {worst:.1e} > 1e-10")

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.22 * len(names) + 1.2))
    ax.barh(range(len(names)), rel_errors, color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(1e-18, 1e-10)
    ax.set_xlabel("max |tinyvit - PyTorch| / max |PyTorch|, float64")
    ax.set_title("Every gradient of one training step, hand-written vs autograd", fontsize=10)
    _tour.save(fig, args, "04_gradient_errors.png")


if __name__ == "__main__":
    main()
