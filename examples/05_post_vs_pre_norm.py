"""Chapter 5: post-norm (the tutorial's nn.TransformerEncoderLayer) against pre-norm (the ViT paper).

The same block parameters, wired two ways (``tinyvit/layers/block.py``)::

    pre-norm  (ViT, timm):                  h = x + attn(norm1(x));   out = h + mlp(norm2(h))
    post-norm (nn.TransformerEncoderLayer): h = norm1(x + attn(x));   out = norm2(h + mlp(h))

Both use the same keys (``blocks.{i}.norm1.weight`` ...), so ``VisionTransformer(norm_first=False)``
loads a pre-norm model's state dict unchanged, and the two compute different functions
with it. In pre-norm the residual path ``x -> out`` is an identity, so a gradient reaches
every block undamped; in post-norm it goes through a LayerNorm at every block, whose
backward rescales it by ``1 / std`` of that block's sum. This chapter measures the gradient
norm per block at initialisation, twice: with timm's small weights (std 0.02) and with
Xavier weights, where it shows what Xiong et al. (2020, "On Layer Normalization in the
Transformer Architecture") found for language models.

First, PyTorch's own ``nn.TransformerEncoderLayer(norm_first=False, activation="gelu")``
loads a tinyvit block's weights (``in_proj_weight`` is tinyvit's fused ``qkv`` weight) and
matches tinyvit's post-norm block, forward and every gradient.

Derivation: docs/block.md. Run: ``python3 examples/05_post_vs_pre_norm.py``.
Picture: ``docs/images/05_grad_norms.png``.
"""
from __future__ import annotations

import _tour
import numpy as np
import torch
import torch.nn as nn

from tinyvit import VisionTransformer, softmax_cross_entropy
from tinyvit.layers.block import block_backward, block_forward

TORCH_NAMES = _tour.ENCODER_LAYER_NAMES  # timm's block keys -> nn.TransformerEncoderLayer's

def torch_layer_matches_post_norm_block() -> None:
    _tour.banner("nn.TransformerEncoderLayer(norm_first=False) == tinyvit's post-norm block")
    dim, heads, mlp_dim, eps = 32, 4, 64, 1e-5  # PyTorch's default eps, as the tutorial
    rng = np.random.default_rng(0)
    # one block's weights, random with std 0.2 (larger than timm's 0.02, so that every path matters)
    p = {k: 0.2 * rng.standard_normal(s) for k, s in {
        "norm1.weight": dim, "norm1.bias": dim, "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": 3 * dim,
        "attn.proj.weight": (dim, dim), "attn.proj.bias": dim, "norm2.weight": dim, "norm2.bias": dim,
        "mlp.fc1.weight": (mlp_dim, dim), "mlp.fc1.bias": mlp_dim, "mlp.fc2.weight": (dim, mlp_dim),
        "mlp.fc2.bias": dim}.items()}
    p["norm1.weight"] += 1.0
    p["norm2.weight"] += 1.0
    x = rng.standard_normal((2, 9, dim))  # (B, N, D)
    dout = rng.standard_normal((2, 9, dim))  # (B, N, D): an upstream gradient

    out, cache = block_forward(x, p, heads, eps, norm_first=False)  # (B, N, D)
    dx, grads = block_backward(dout, cache)

    layer = nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout=0.0, activation="gelu", layer_norm_eps=eps,
                                       batch_first=True, norm_first=False).double()
    layer.load_state_dict({TORCH_NAMES[k]: torch.tensor(v) for k, v in p.items()})
    x_t = torch.tensor(x, requires_grad=True)
    out_t = layer(x_t)
    (out_t * torch.tensor(dout)).sum().backward()  # L = sum(out * dout), so dL/dout = dout
    named = dict(layer.named_parameters())
    print(f"in_proj_weight {tuple(named['self_attn.in_proj_weight'].shape)} = blocks.i.attn.qkv.weight (3D, D): "
          f"rows [q | k | v]")
    print(f"forward: max abs error {_tour.max_err(out, out_t.detach().numpy())[0]:.1e}; "
          f"dx: {_tour.max_err(dx, x_t.grad.numpy())[0]:.1e}")
    worst = max(_tour.max_err(g, named[TORCH_NAMES[k]].grad.numpy())[1] for k, g in grads.items())
    print(f"all 12 parameter gradients: worst relative error {worst:.1e}")
    if worst > 1e-10:
        raise SystemExit("tinyvit's post-norm block disagrees with nn.TransformerEncoderLayer")


def block_grad_norms(m: VisionTransformer) -> np.ndarray:
    """(depth,): the norm of block i's weight-matrix gradients (qkv, proj, fc1, fc2) together."""
    return np.array([np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for k, g in m.grads.items()
                                 if k.startswith(f"blocks.{i}.") and g.ndim == 2))
                     for i in range(m.config.depth)])


def xavier_blocks(state_dict: dict, seed: int) -> dict:
    """The same state dict with every block's weight matrix redrawn Xavier-normal,
    std sqrt(2 / (fan_in + fan_out)): branches as large as the residual stream, as in
    Xiong et al. and close to PyTorch's own initialisation of nn.TransformerEncoderLayer."""
    rng = np.random.default_rng(seed)
    out = dict(state_dict)
    for k, v in state_dict.items():
        if k.startswith("blocks.") and v.ndim == 2:
            out[k] = (rng.standard_normal(v.shape) * np.sqrt(2.0 / sum(v.shape))).astype(v.dtype)
    return out


def main() -> None:
    args = _tour.parse_args(__doc__)
    torch_layer_matches_post_norm_block()

    depth = 6 if args.quick else 12
    images, labels = _tour.digits()  # (1797, 1, 8, 8), (1797,)
    x, y = images[:128], labels[:128]  # (B, C, H, W) = (128, 1, 8, 8)
    config = dict(image_size=8, patch_size=2, num_classes=10, dim=64, depth=depth, heads=4, mlp_dim=128, channels=1)
    norms = {}
    for init in ("timm (std 0.02)", "Xavier"):
        _tour.banner(f"the same weights, pre-norm and post-norm, {depth} blocks, {init} initialisation")
        pre = VisionTransformer(**config, norm_first=True, seed=0)
        if init == "Xavier":
            pre.load_state_dict(xavier_blocks(pre.state_dict(), seed=1))
        post = VisionTransformer(**config, norm_first=False, seed=0)
        post.load_state_dict(pre.state_dict())  # same keys, same shapes: loads without a word
        print(f"x {x.shape}; {pre.num_params():,} parameters each; post.load_state_dict(pre.state_dict()) worked")
        outs = {}
        for name, m in (("pre-norm", pre), ("post-norm", post)):
            logits = m.forward(x)  # (B, K)
            loss, dlogits = softmax_cross_entropy(logits, y)
            m.backward(dlogits)
            norms[init, name] = block_grad_norms(m)
            outs[name] = logits
            print(f"{name:9s} loss {float(loss):.4f}; |dL/dW of block i|, i = 0..{depth - 1}: "
                  + " ".join(f"{v:.3f}" for v in norms[init, name]))
        print(f"same weights, different functions: logits differ by up to "
              f"{_tour.max_err(outs['pre-norm'], outs['post-norm'])[0]:.2f}")
        for name in ("pre-norm", "post-norm"):
            v = norms[init, name]
            print(f"{name:9s} last block / first block: {v[-1] / v[0]:.2f};  last / second: {v[-1] / v[1]:.2f}")
    print("""
timm's init (std 0.02) makes every branch tiny next to the residual stream, so both wirings pass the gradient
down almost unchanged; post-norm's block 0 stands out because its LayerNorms see the raw patch embedding, whose
scale is not 1, and the LayerNorm backward multiplies by 1 / std. With Xavier weights the branches are as large
as the stream: post-norm's gradients grow toward the output (each LayerNorm on the residual path rescales what
passes through it); pre-norm's do not grow (its residual path x -> out is an identity; here they shrink a
little). That is Xiong et al.'s finding, and why post-norm Transformers need a learning-rate warm-up while ViT
(pre-norm) trains more easily.""")

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, init in zip(axes, ("timm (std 0.02)", "Xavier")):
        for name, marker in (("pre-norm", "o"), ("post-norm", "s")):
            ax.plot(range(depth), norms[init, name], marker=marker, label=f"{name} (norm_first={name == 'pre-norm'})")
        ax.set_xlabel("block i")
        ax.set_yscale("log")
        ax.set_title(f"{init} initialisation", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("|dL/dW| of block i (qkv, proj, fc1, fc2)")
    axes[0].legend(fontsize=9)
    fig.suptitle(f"Gradient norm per block at initialisation, the same weights in both wirings "
                 f"(digits, D=64, {depth} blocks, batch 128)", fontsize=10)
    _tour.save(fig, args, "05_grad_norms.png")


if __name__ == "__main__":
    main()
