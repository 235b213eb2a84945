"""The anchor in the same run: PyTorch's ``torch.ao.quantization.quantize_dynamic`` on the same weights.

:func:`torch_module` builds a tinyvit model as a PyTorch ``nn.Module`` made of ``nn.Linear``
layers (timm's pre-norm ViT; the patch embedding as a linear map over the patches, the same
arithmetic as the stride-P convolution), so that ``quantize_dynamic`` finds every linear
layer tinyvit quantises. Differences that remain, by design of the two schemes:

- PyTorch's dynamic quantisation measures each activation's range on the batch itself, at
  run time (uint8, asymmetric, ``reduce_range`` on x86), where tinyvit's static PTQ fixes the
  input scales by calibration beforehand (int8, symmetric);
- with ``per_channel=True`` the weights are per output channel (``per_channel_dynamic_qconfig``),
  as tinyvit's; the default qconfig is per tensor.
"""
from __future__ import annotations

import math

import numpy as np


def torch_module(model):
    """A ``torch.nn.Module`` computing ``model``'s float logits (pre-norm, plain attention, no dropout)."""
    import torch
    from torch import nn

    c = model.config
    if not c.norm_first or c.distilled or c.pos_embed != "learned" or c.attn_impl != "plain":
        raise ValueError("the PyTorch anchor covers pre-norm ViTs with learned positions, no distillation token")
    sd = {k: torch.tensor(np.asarray(v, dtype=np.float32)) for k, v in model.state_dict().items()}
    F = torch.nn.functional

    def linear(key, out_f, in_f, bias=True):
        lin = nn.Linear(in_f, out_f, bias=bias)
        lin.weight.data = sd[key + ".weight"].reshape(out_f, in_f).clone()
        if bias:
            lin.bias.data = sd[key + ".bias"].clone()
        return lin

    class Block(nn.Module):
        def __init__(self, i):
            super().__init__()
            pre = f"blocks.{i}."
            self.pre, self.heads = pre, c.heads
            self.qkv = linear(pre + "attn.qkv", 3 * c.dim, c.dim, c.qkv_bias)
            self.proj = linear(pre + "attn.proj", c.dim, c.dim)
            self.fc1 = linear(pre + "mlp.fc1", c.mlp_dim, c.dim)
            self.fc2 = linear(pre + "mlp.fc2", c.dim, c.mlp_dim)

        def forward(self, x):
            B, N, D = x.shape
            hs = D // self.heads
            ln = lambda t, n: F.layer_norm(t, (D,), sd[self.pre + n + ".weight"], sd[self.pre + n + ".bias"],  # noqa
                                           c.layer_norm_eps)
            qkv = self.qkv(ln(x, "norm1")).reshape(B, N, 3, self.heads, hs).permute(2, 0, 3, 1, 4)
            att = ((qkv[0] @ qkv[1].transpose(-2, -1)) / math.sqrt(hs)).softmax(-1)
            x = x + self.proj((att @ qkv[2]).transpose(1, 2).reshape(B, N, D))
            return x + self.fc2(F.gelu(self.fc1(ln(x, "norm2")), approximate=c.gelu))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            p = c.patch_size
            self.patch = linear("patch_embed.proj", c.dim, c.channels * p * p)
            self.blocks = nn.ModuleList(Block(i) for i in range(c.depth))
            self.head = linear("head", c.num_classes, c.dim)

        def forward(self, x):
            p = c.patch_size
            B, C, H, W = x.shape
            patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
            t = torch.cat([sd["cls_token"].expand(B, -1, -1), self.patch(patches)], 1) + sd["pos_embed"]
            for blk in self.blocks:
                t = blk(t)
            norm = c.final_norm
            if c.pool == "cls":
                v = F.layer_norm(t, (c.dim,), sd[norm + ".weight"], sd[norm + ".bias"], c.layer_norm_eps)[:, 0]
            else:
                v = F.layer_norm(t[:, 1:].mean(1), (c.dim,), sd[norm + ".weight"], sd[norm + ".bias"], c.layer_norm_eps)
            return self.head(v)

    return ViT().eval()


def dynamic_int8(module, per_channel: bool = True):
    """``torch.ao.quantization.quantize_dynamic`` of every ``nn.Linear`` (qint8 weights)."""
    import warnings

    import torch

    with warnings.catch_warnings():  # torch.ao.quantization says it is deprecated (torchao replaces it)
        warnings.simplefilter("ignore")
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

        qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        return quantize_dynamic(module, {torch.nn.Linear: qconfig}, dtype=torch.qint8)


def logits(module, images: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return module(torch.tensor(np.ascontiguousarray(images, dtype=np.float32))).numpy()
