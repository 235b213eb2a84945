"""Chapter 0: the tutorial's own mistakes, run and explained.

The tutorial (../shared/reference/vit-tutorial.txt) explains a ViT with PyTorch code, and
some of that code does not run. Each section below runs the tutorial's code as written,
prints what goes wrong, and then the fix, checked against tinyvit:

1. its full model's patch embedding ``Conv2d -> Flatten(2) -> Linear`` applies the Linear
   over the token axis: ``(B, D, Np)`` must become ``(B, Np, D)`` first;
2. its ``ImageToPatches`` flattens a patch as ``(p1 p2 c)``, which a Conv2d weight cannot use;
3. its attention builds its scale as a tensor on a fixed device (and dtype) at construction;
4. its positional encoding uses ``math`` before the ``import math`` line;
5. its encoder layer is PyTorch's post-norm ``nn.TransformerEncoderLayer`` (eps 1e-5, and
   ReLU with a 2048-wide feed-forward unless told otherwise), which cannot run the weights
   of any published ViT, all of which are pre-norm.

Run: ``python3 examples/00_tutorial_mistakes.py`` (CPU, a few seconds).
Picture: ``docs/images/00_patch_embed_axes.png``.
"""
from __future__ import annotations

import math

import _tour
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyvit.layers.block import block_forward
from tinyvit.layers.patch_embed import patch_embed_forward, patchify_forward
from tinyvit.layers.tokens import sincos_1d_table


def tutorial_patch_embedding(channels: int, patch: int, dim: int) -> nn.Sequential:
    """The tutorial's ``VisionTransformer.to_patch_embedding``, as written."""
    patch_dim = channels * patch ** 2
    return nn.Sequential(
        nn.Conv2d(channels, patch_dim, kernel_size=patch, stride=patch),
        nn.Flatten(start_dim=2),
        nn.Linear(patch_dim, dim),
    )


def fixed_patch_embedding(embed: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The fix: put the channel axis last before the Linear."""
    conv, flatten, linear = embed
    x = flatten(conv(x))  # (B, C*P*P, H/P, W/P) -> (B, C*P*P, Np)
    x = x.transpose(1, 2)  # (B, Np, C*P*P): one row per patch
    return linear(x)  # (B, Np, D)


def section_patch_embedding(args) -> None:
    _tour.banner("1. Conv2d -> Flatten(2) -> Linear: the Linear meets the wrong axis")
    torch.manual_seed(0)
    embed = tutorial_patch_embedding(channels=3, patch=16, dim=768).double()
    x = torch.rand(1, 3, 224, 224, dtype=torch.float64)
    conv, flatten, linear = embed
    print(f"image                     {tuple(x.shape)}")
    print(f"Conv2d(3, 768, 16, 16)    {tuple(conv(x).shape)}      (B, C*P*P, H/P, W/P)")
    print(f"Flatten(start_dim=2)      {tuple(flatten(conv(x)).shape)}         "
          f"(B, C*P*P, Np): patches are the LAST axis")
    print(f"Linear(768, 768) acts on the last axis, which has 196 entries, not 768:")
    try:
        embed(x)
        raise SystemExit("the tutorial's patch embedding ran; it should not (PyTorch changed?)")
    except RuntimeError as exc:
        print(f"  RuntimeError: {exc}")

    out = fixed_patch_embedding(embed, x)
    print(f"fix: .transpose(1, 2)     {tuple(flatten(conv(x)).transpose(1, 2).shape)}         (B, Np, C*P*P)")
    print(f"     then Linear          {tuple(out.shape)}         (B, Np, D)")

    # tinyvit's patch embedding is patching + one linear map, and equals the conv alone:
    w, b = conv.weight.detach().numpy(), conv.bias.detach().numpy()  # (768, 3, 16, 16), (768,)
    ours, _ = patch_embed_forward(x.numpy(), w, b)  # (1, 196, 768)
    conv_tokens = flatten(conv(x)).transpose(1, 2).detach().numpy()  # (1, 196, 768)
    print(f"tinyvit patch_embed_forward(x, conv.weight, conv.bias) vs conv(x).flatten(2).transpose(1, 2): "
          f"max abs error {_tour.max_err(ours, conv_tokens)[0]:.1e}")
    # Conv then Linear is two linear maps in a row, i.e. one: W = W_lin @ W_conv, b = W_lin @ b_conv + b_lin.
    w_lin, b_lin = linear.weight.detach().numpy(), linear.bias.detach().numpy()  # (D, 768), (D,)
    w_one = (w_lin @ w.reshape(768, -1)).reshape(-1, 3, 16, 16)  # (D, 768) @ (768, 768) -> (D, 3, 16, 16)
    b_one = w_lin @ b + b_lin  # (D,)
    ours_one, _ = patch_embed_forward(x.numpy(), w_one, b_one)  # (1, 196, D)
    print(f"the fixed Conv2d+Linear is ONE patch embedding (W_lin @ W_conv): max abs error "
          f"{_tour.max_err(ours_one, out.detach().numpy())[0]:.1e}; "
          f"the tutorial could use Conv2d(3, dim, 16, 16) alone")

    # Where it does NOT fail it is worse: 1 channel, 16x16 image, P = 4 gives Np = C*P*P = 16,
    # the Linear runs, and every output token mixes all 16 patches.
    torch.manual_seed(0)
    small = tutorial_patch_embedding(channels=1, patch=4, dim=16).double()
    x_small = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    tutorial_out = small(x_small)  # runs: (1, 16, 16), but the axes are (B, C*P*P, D)
    print(f"\n1 channel, 16x16 image, P=4: Np = C*P*P = 16, so the tutorial's code runs -> {tuple(tutorial_out.shape)}")

    def depends(run) -> np.ndarray:
        """(Np, Np) bool: output token i changes when input patch j changes."""
        base = run(x_small).detach().numpy()[0]  # (16, 16)
        grid = np.zeros((16, 16), dtype=bool)
        for j in range(16):
            bumped = x_small.clone()
            row, col = divmod(j, 4)
            bumped[0, 0, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] += 1.0
            grid[:, j] = np.abs(run(bumped).detach().numpy()[0] - base).max(axis=1) > 1e-12
        return grid

    wrong = depends(small)
    right = depends(lambda t: fixed_patch_embedding(small, t))
    print(f"  tutorial: each output token depends on {wrong.sum(axis=1).mean():.0f} of 16 patches "
          f"(they are not tokens at all); fixed: on {right.sum(axis=1).mean():.0f}")

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    titles = ("tutorial: Flatten(2) -> Linear", "fixed: .transpose(1, 2) -> Linear")
    for ax, grid, title in zip(axes, (wrong, right), titles):
        ax.imshow(grid, cmap="Greys", vmin=0, vmax=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("input patch j")
        ax.set_ylabel("output token i")
    fig.suptitle("Which input patches each output token depends on (1x16x16 image, P=4, where the bug runs silently)",
                 fontsize=9)
    _tour.save(fig, args, "00_patch_embed_axes.png")


def section_patch_order() -> None:
    _tour.banner("2. ImageToPatches flattens (p1 p2 c); a Conv2d weight is (c p1 p2)")
    from einops import rearrange

    x = np.arange(2 * 3 * 4 * 4, dtype=np.float64).reshape(2, 3, 4, 4)  # (B, C, H, W), each pixel its own index
    tutorial = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=2, p2=2)  # (2, 4, 12)
    ours, _ = patchify_forward(x, 2)  # (2, 4, 12)
    print(f"patch 0 of image 0, tutorial (p1 p2 c): {tutorial[0, 0].astype(int).tolist()}")
    print(f"patch 0 of image 0, tinyvit  (c p1 p2): {ours[0, 0].astype(int).tolist()}")
    print("same numbers, another order: both are fine for a Linear trained from scratch, but only (c p1 p2) is the")
    print("memory order of a Conv2d(C, D, P, stride=P) weight (D, C, P, P), so only it loads a published ViT's")
    print("patch_embed weights")


class TutorialMultiHeadAttention(nn.Module):
    """The tutorial's attention, unchanged (only the forward's comments trimmed)."""

    def __init__(self, d_model=768, num_heads=12, dropout=0.1):
        super().__init__()
        assert d_model % num_heads == 0
        self.d_model, self.num_heads, self.d_k = d_model, num_heads, d_model // num_heads
        self.W_q, self.W_k = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.W_v, self.W_o = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.scale = torch.sqrt(torch.FloatTensor([self.d_k])).to("cuda" if torch.cuda.is_available() else "cpu")

    def forward(self, x):
        batch_size, seq_len, _ = x.shape
        Q = self.W_q(x).view(batch_size, seq_len, self.num_heads, self.d_k).transpose(1, 2)
        K = self.W_k(x).view(batch_size, seq_len, self.num_heads, self.d_k).transpose(1, 2)
        V = self.W_v(x).view(batch_size, seq_len, self.num_heads, self.d_k).transpose(1, 2)
        scores = torch.matmul(Q, K.transpose(-2, -1)) / self.scale
        attention = self.dropout(F.softmax(scores, dim=-1))
        output = torch.matmul(attention, V).transpose(1, 2).contiguous().view(batch_size, seq_len, self.d_model)
        return self.W_o(output)


def section_attention_scale() -> None:
    _tour.banner("3. The attention's scale is a tensor fixed to one device and dtype when it is built")
    torch.manual_seed(0)
    attn = TutorialMultiHeadAttention(d_model=64, num_heads=4).eval()
    print(f"scale = {attn.scale} (device {attn.scale.device}, dtype {attn.scale.dtype}); "
          f"in state_dict: {'scale' in attn.state_dict()}; a buffer: {any(b is attn.scale for b in attn.buffers())}")
    print("so model.to(...) / .cuda() / .half() never move or cast it. Built on a GPU machine and moved to the")
    print("CPU (or the reverse), the forward fails with 'Expected all tensors to be on the same device'. On this")
    print("CPU the same cause shows with a dtype instead:")
    x = torch.randn(2, 5, 64)
    attn_bf16 = attn.to(torch.bfloat16)
    try:
        attn_bf16(x.to(torch.bfloat16))
        print("  (it ran: this PyTorch promotes differently)")
    except RuntimeError as exc:
        print(f"  model.to(torch.bfloat16)(x) -> RuntimeError: {exc}")
    print("fix: a Python float, which follows whatever tensor it scales: self.scale = self.d_k ** -0.5;")
    print("     tinyvit's attention_forward uses scale = 1.0 / math.sqrt(hs), a Python float (float32 stays float32)")


TUTORIAL_POSITIONAL_ENCODING = '''
class PositionalEncoding(nn.Module):
    def __init__(self, d_model=768, max_len=5000):
        super(PositionalEncoding, self).__init__()
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len).unsqueeze(1).float()
        div_term = torch.exp(torch.arange(0, d_model, 2).float() *
                             -(math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        pe = pe.unsqueeze(0)  # (1, max_len, d_model)
        self.register_buffer('pe', pe)

    def forward(self, x):
        return x + self.pe[:, :x.size(1)]
'''


def section_math_import() -> None:
    _tour.banner("4. PositionalEncoding uses math before `import math`")
    namespace = {"torch": torch, "nn": nn}  # what the tutorial has imported at that point
    exec(TUTORIAL_POSITIONAL_ENCODING, namespace)  # defining the class is fine ...
    try:
        namespace["PositionalEncoding"](d_model=64, max_len=197)  # ... building one is not
        print("  (it ran: math was importable)")
    except NameError as exc:
        print(f"  PositionalEncoding(d_model=64, max_len=197) -> NameError: {exc}")
    print("the tutorial's `import math` comes after the class; copied on its own, the class cannot be built.")
    namespace["math"] = math  # the fix: import math at the top
    pe = namespace["PositionalEncoding"](d_model=64, max_len=197).pe[0].numpy()  # (197, 64) float32
    ours = sincos_1d_table(197, 64)  # (197, 64) float64
    print(f"with `import math` first, its table equals tinyvit.layers.tokens.sincos_1d_table(197, 64): max abs error "
          f"{_tour.max_err(pe, ours)[0]:.1e} (float32 against float64)")


def section_post_norm() -> None:
    _tour.banner("5. nn.TransformerEncoderLayer is post-norm; every published ViT is pre-norm")
    default = nn.TransformerEncoderLayer(d_model=64, nhead=4, batch_first=True)
    print(f"nn.TransformerEncoderLayer defaults: activation={default.activation.__name__}, "
          f"dim_feedforward={default.linear1.out_features}, layer_norm_eps={default.norm1.eps}, "
          f"norm_first={default.norm_first}")
    print("the tutorial passes activation='gelu' and dim_feedforward=mlp_dim, but keeps eps 1e-5 and post-norm.")

    dim, heads, mlp_dim = 64, 4, 128
    rng = np.random.default_rng(0)
    p = {  # one pre-norm block in timm's layout (a published checkpoint's blocks.{i}.*), random weights
        "norm1.weight": 1.0 + 0.1 * rng.standard_normal(dim), "norm1.bias": 0.1 * rng.standard_normal(dim),
        "attn.qkv.weight": 0.1 * rng.standard_normal((3 * dim, dim)),
        "attn.qkv.bias": 0.1 * rng.standard_normal(3 * dim),
        "attn.proj.weight": 0.1 * rng.standard_normal((dim, dim)), "attn.proj.bias": 0.1 * rng.standard_normal(dim),
        "norm2.weight": 1.0 + 0.1 * rng.standard_normal(dim), "norm2.bias": 0.1 * rng.standard_normal(dim),
        "mlp.fc1.weight": 0.1 * rng.standard_normal((mlp_dim, dim)), "mlp.fc1.bias": 0.1 * rng.standard_normal(mlp_dim),
        "mlp.fc2.weight": 0.1 * rng.standard_normal((dim, mlp_dim)), "mlp.fc2.bias": 0.1 * rng.standard_normal(dim),
    }
    torch_names = _tour.ENCODER_LAYER_NAMES  # timm -> nn.TransformerEncoderLayer
    sd = {torch_names[k]: torch.tensor(v) for k, v in p.items()}
    try:
        default.double().load_state_dict(sd)
    except RuntimeError as exc:
        first = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line][0]
        print(f"defaults (ReLU, 2048) cannot even load it: {first}")

    x = rng.standard_normal((2, 17, dim))  # (B, N, D)
    vit_out, _ = block_forward(x, p, heads, eps=1e-6, norm_first=True)  # what the checkpoint was trained as
    for label, norm_first, eps in (("the tutorial's layer (post-norm, eps 1e-5)", False, 1e-5),
                                   ("norm_first=True, layer_norm_eps=1e-6      ", True, 1e-6)):
        layer = nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=norm_first, layer_norm_eps=eps).double().eval()
        layer.load_state_dict(sd)  # same shapes: it loads without a word ...
        with torch.no_grad():
            out = layer(torch.tensor(x)).numpy()
        print(f"{label}: loads, and its output differs from the ViT block's by {_tour.max_err(out, vit_out)[0]:.1e}")
    print("... so the tutorial's model loads a ViT checkpoint's shapes but computes another function with them.")


def main() -> None:
    args = _tour.parse_args(__doc__)
    section_patch_embedding(args)
    section_patch_order()
    section_attention_scale()
    section_math_import()
    section_post_norm()


if __name__ == "__main__":
    main()
