"""Property tests: every layer against PyTorch autograd over drawn shapes, dtypes and eps.

For each draw: run tinyvit's forward and backward with a random upstream gradient ``dout``;
run the same op in PyTorch and call ``(out * dout).sum().backward()``; compare the output
and every gradient with the tolerance of the dtype in tests/tolerances.py (float64 tight,
float32 loose). Dropout masks are drawn once and injected into both sides.
"""
import math

import numpy as np
import torch
import torch.nn.functional as Fn
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyvit.layers.attention import attention_backward, attention_forward, softmax_backward, softmax_forward
from tinyvit.layers.block import BlockMasks, block_backward, block_forward
from tinyvit.layers.dropout import drop_path_backward, drop_path_forward, dropout_backward, dropout_forward
from tinyvit.layers.gelu import gelu_backward, gelu_forward
from tinyvit.layers.head import mean_pool_forward, pool_backward, token_pool_forward
from tinyvit.layers.layernorm import layernorm_backward, layernorm_forward
from tinyvit.layers.linear import linear_backward, linear_forward
from tinyvit.layers.loss import cross_entropy_backward, cross_entropy_forward
from tinyvit.layers.mlp import mlp_backward, mlp_forward
from tinyvit.layers.patch_embed import patch_embed_backward, patch_embed_forward
from tinyvit.layers.tokens import add_pos_embed_backward, add_pos_embed_forward, prepend_tokens_backward, prepend_tokens_forward
from tests import strategies as S
from tests.tolerances import TOLERANCES, assert_close
from tests.torch_twin import torch_attention, torch_block

PROPERTY = settings(max_examples=25, deadline=None)
TORCH_DTYPE = {"float64": torch.float64, "float32": torch.float32}


def torch_leaves(arrays, dtype):
    return [None if a is None else torch.tensor(np.ascontiguousarray(a), dtype=TORCH_DTYPE[dtype], requires_grad=True)
            for a in arrays]


def compare(name, out, grads, t_out, t_inputs, dout, dtype, names):
    """Backpropagate ``dout`` through the torch graph and compare output and gradients."""
    tol = TOLERANCES[dtype]
    (t_out * torch.tensor(dout, dtype=TORCH_DTYPE[dtype])).sum().backward()
    assert out.dtype == np.dtype(dtype), f"{name}: output dtype {out.dtype}, expected {dtype}"
    assert_close(f"{name} out", out, t_out.detach().numpy(), **tol)
    for n, g, t in zip(names, grads, t_inputs):
        if t is None:
            continue
        assert g.dtype == np.dtype(dtype), f"{name} d{n}: dtype {g.dtype}, expected {dtype}"
        assert_close(f"{name} d{n}", g, t.grad.numpy(), **tol)


@PROPERTY
@given(S.batch, S.tokens, S.heads, S.head_size, S.hidden, S.dtypes, S.seeds, st.booleans(), st.booleans())
def test_linear(B, N, NH, hs, F, dtype, seed, bias, noncontiguous):
    rng = np.random.default_rng(seed)
    D = NH * hs
    x = S.maybe_noncontiguous(rng, S.normal(rng, (B, N, D), dtype), noncontiguous)
    w, b = S.normal(rng, (F, D), dtype), (S.normal(rng, (F,), dtype) if bias else None)
    out, cache = linear_forward(x, w, b)
    dout = S.normal(rng, out.shape, dtype)
    grads = linear_backward(dout, cache)
    t = torch_leaves([x, w, b], dtype)
    compare("linear", out, grads, Fn.linear(*t), t, dout, dtype, ["x", "w", "b"])


@PROPERTY
@given(S.batch, S.channels, S.patch, S.grid, S.grid, S.heads, S.dtypes, S.seeds, st.booleans())
def test_patch_embed_equals_conv2d(B, C, P, gh, gw, D, dtype, seed, noncontiguous):
    rng = np.random.default_rng(seed)
    x = S.maybe_noncontiguous(rng, S.normal(rng, (B, C, gh * P, gw * P), dtype), noncontiguous)
    w, b = S.normal(rng, (D, C, P, P), dtype), S.normal(rng, (D,), dtype)
    out, cache = patch_embed_forward(x, w, b)
    dout = S.normal(rng, out.shape, dtype)
    grads = patch_embed_backward(dout, cache)
    t = torch_leaves([x, w, b], dtype)
    t_out = Fn.conv2d(t[0], t[1], t[2], stride=P).flatten(2).transpose(1, 2)  # (B, Np, D)
    compare("patch_embed", out, grads, t_out, t, dout, dtype, ["x", "w", "b"])


@PROPERTY
@given(S.batch, S.tokens, S.heads, S.dtypes, S.seeds, st.booleans())
def test_tokens_and_pos_embed(B, Np, D, dtype, seed, distilled):
    rng = np.random.default_rng(seed)
    x, cls, dist = S.normal(rng, (B, Np, D), dtype), S.normal(rng, (1, 1, D), dtype), S.normal(rng, (1, 1, D), dtype)
    prefix = [cls, dist] if distilled else [cls]
    T = len(prefix)
    pos = S.normal(rng, (1, Np + T, D), dtype)
    h, c1 = prepend_tokens_forward(x, *prefix)
    out, c2 = add_pos_embed_forward(h, pos)
    dout = S.normal(rng, out.shape, dtype)
    dh, dpos = add_pos_embed_backward(dout, c2)
    dx, *dprefix = prepend_tokens_backward(dh, c1)
    t = torch_leaves([x, pos] + prefix, dtype)
    t_out = torch.cat([p.expand(B, -1, -1) for p in t[2:]] + [t[0]], dim=1) + t[1]
    compare("tokens", out, [dx, dpos] + dprefix, t_out, t, dout, dtype, ["x", "pos", "cls", "dist"])


@PROPERTY
@given(S.batch, S.tokens, S.heads, S.head_size, S.eps, S.dtypes, S.seeds, st.booleans())
def test_layernorm(B, N, NH, hs, eps, dtype, seed, noncontiguous):
    rng = np.random.default_rng(seed)
    D = NH * hs + 3  # >= 4: a row of 2 values is all cancellation in float32
    x = S.maybe_noncontiguous(rng, S.normal(rng, (B, N, D), dtype, 2.0) + 0.5, noncontiguous)
    w, b = S.normal(rng, (D,), dtype), S.normal(rng, (D,), dtype)
    out, cache = layernorm_forward(x, w, b, eps)
    dout = S.normal(rng, out.shape, dtype)
    grads = layernorm_backward(dout, cache)
    t = torch_leaves([x, w, b], dtype)
    compare("layernorm", out, grads, Fn.layer_norm(t[0], (D,), t[1], t[2], eps), t, dout, dtype, ["x", "w", "b"])


@PROPERTY
@given(S.batch, S.tokens, S.hidden, st.sampled_from(["none", "tanh"]), S.dtypes, S.seeds)
def test_gelu(B, N, F, approximate, dtype, seed):
    rng = np.random.default_rng(seed)
    x = S.normal(rng, (B, N, F), dtype, 3.0)
    out, cache = gelu_forward(x, approximate)
    dout = S.normal(rng, out.shape, dtype)
    dx = gelu_backward(dout, cache)
    t = torch_leaves([x], dtype)
    compare(f"gelu[{approximate}]", out, [dx], Fn.gelu(t[0], approximate=approximate), t, dout, dtype, ["x"])


@PROPERTY
@given(S.batch, S.tokens, S.hidden, S.rates, S.dtypes, S.seeds, st.booleans())
def test_dropout_and_drop_path(B, N, F, p, dtype, seed, per_sample):
    rng = np.random.default_rng(seed)
    x = S.normal(rng, (B, N, F), dtype)
    shape = (B, 1, 1) if per_sample else x.shape
    mask = rng.random(shape) >= p
    fwd, bwd = (drop_path_forward, drop_path_backward) if per_sample else (dropout_forward, dropout_backward)
    out, cache = fwd(x, p, True, mask=mask)
    dout = S.normal(rng, out.shape, dtype)
    dx = bwd(dout, cache)
    t = torch_leaves([x], dtype)
    t_out = t[0] * torch.tensor(mask) / (1.0 - p)
    compare("dropout", out, [dx], t_out, t, dout, dtype, ["x"])
    # evaluation: the identity, whatever p
    out_eval, cache_eval = fwd(x, p, False, rng=np.random.default_rng(0))
    assert out_eval is x and bwd(dout, cache_eval) is dout


@PROPERTY
@given(S.batch, S.heads, S.tokens, S.dtypes, S.seeds)
def test_softmax(B, NH, N, dtype, seed):
    rng = np.random.default_rng(seed)
    x = S.normal(rng, (B, NH, N, N), dtype, 5.0)
    out, cache = softmax_forward(x)
    dout = S.normal(rng, out.shape, dtype)
    dx = softmax_backward(dout, cache)
    t = torch_leaves([x], dtype)
    compare("softmax", out, [dx], t[0].softmax(-1), t, dout, dtype, ["x"])


@PROPERTY
@given(S.batch, S.tokens, S.heads, S.head_size, S.rates, S.dtypes, S.seeds, st.booleans())
def test_attention(B, N, NH, hs, p, dtype, seed, qkv_bias):
    rng = np.random.default_rng(seed)
    D = NH * hs
    x = S.normal(rng, (B, N, D), dtype)
    qkv_w, proj_w = S.normal(rng, (3 * D, D), dtype, 1 / math.sqrt(D)), S.normal(rng, (D, D), dtype, 1 / math.sqrt(D))
    qkv_b = S.normal(rng, (3 * D,), dtype) if qkv_bias else None
    proj_b = S.normal(rng, (D,), dtype)
    mask = rng.random((B, NH, N, N)) >= p if p else None
    out, cache = attention_forward(x, qkv_w, qkv_b, proj_w, proj_b, NH, p, True, attn_mask=mask)
    dout = S.normal(rng, out.shape, dtype)
    grads = attention_backward(dout, cache)
    t = torch_leaves([x, qkv_w, qkv_b, proj_w, proj_b], dtype)
    t_out = torch_attention(*t, NH, None if mask is None else torch.tensor(mask), p)
    compare("attention", out, grads, t_out, t, dout, dtype, ["x", "qkv_w", "qkv_b", "proj_w", "proj_b"])


@PROPERTY
@given(S.batch, S.tokens, S.heads, S.hidden, S.rates, st.sampled_from(["none", "tanh"]), S.dtypes, S.seeds)
def test_mlp(B, N, D, F, p, approximate, dtype, seed):
    rng = np.random.default_rng(seed)
    x = S.normal(rng, (B, N, D), dtype)
    w1, b1, w2, b2 = (S.normal(rng, (F, D), dtype), S.normal(rng, (F,), dtype), S.normal(rng, (D, F), dtype),
                      S.normal(rng, (D,), dtype))
    masks = (rng.random((B, N, F)) >= p, rng.random((B, N, D)) >= p)
    out, cache = mlp_forward(x, w1, b1, w2, b2, p, True, approximate=approximate, masks=masks)
    dout = S.normal(rng, out.shape, dtype)
    grads = mlp_backward(dout, cache)
    t = torch_leaves([x, w1, b1, w2, b2], dtype)
    h = Fn.gelu(Fn.linear(t[0], t[1], t[2]), approximate=approximate) * torch.tensor(masks[0]) / (1 - p)
    t_out = Fn.linear(h, t[3], t[4]) * torch.tensor(masks[1]) / (1 - p)
    compare("mlp", out, grads, t_out, t, dout, dtype, ["x", "fc1_w", "fc1_b", "fc2_w", "fc2_b"])


@PROPERTY
@given(S.batch, S.tokens, S.heads, S.head_size, S.hidden, S.eps, st.booleans(), S.rates, S.dtypes, S.seeds)
def test_block(B, N, NH, hs, F, eps, norm_first, p, dtype, seed):
    rng = np.random.default_rng(seed)
    D = NH * (hs + 3)  # hs >= 4: LayerNorm over a handful of values is all cancellation in float32
    shapes = S.block_param_shapes(D, F)
    params = {k: S.normal(rng, s, dtype, 0.5) for k, s in shapes.items()}
    x = S.normal(rng, (B, N, D), dtype)
    masks = BlockMasks(*[rng.random(s) >= p for s in [(B, NH, N, N), (B, N, D), (B, N, F), (B, N, D), (B, 1, 1),
                                                       (B, 1, 1)]])
    out, cache = block_forward(x, params, NH, eps, norm_first, p, p, p, "none", True, masks=masks)
    dout = S.normal(rng, out.shape, dtype)
    dx, grads = block_backward(dout, cache)
    keys = list(shapes)
    t = torch_leaves([x] + [params[k] for k in keys], dtype)
    tp = dict(zip(keys, t[1:]))
    tm = {k: torch.tensor(v) for k, v in masks._asdict().items()}
    t_out = torch_block(t[0], tp, "", NH, eps, norm_first, "none", tm, p, p, p)
    compare(f"block[norm_first={norm_first}]", out, [dx] + [grads[k] for k in keys], t_out, t, dout, dtype,
            ["x"] + keys)


@PROPERTY
@given(S.batch, S.tokens, S.heads, st.integers(1, 2), S.dtypes, S.seeds)
def test_pools(B, Np, D, T, dtype, seed):
    rng = np.random.default_rng(seed)
    x = S.normal(rng, (B, T + Np, D), dtype)
    for index in range(T):
        out, cache = token_pool_forward(x, index)
        dout = S.normal(rng, out.shape, dtype)
        t = torch_leaves([x], dtype)
        compare("token pool", out, [pool_backward(dout, cache)], t[0][:, index], t, dout, dtype, ["x"])
    out, cache = mean_pool_forward(x, T)
    dout = S.normal(rng, out.shape, dtype)
    t = torch_leaves([x], dtype)
    compare("mean pool", out, [pool_backward(dout, cache)], t[0][:, T:].mean(1), t, dout, dtype, ["x"])


@PROPERTY
@given(S.batch, st.integers(2, 9), st.sampled_from([0.0, 0.1, 0.3]), st.booleans(), S.dtypes, S.seeds)
def test_cross_entropy(B, K, smoothing, soft, dtype, seed):
    rng = np.random.default_rng(seed)
    logits = S.normal(rng, (B, K), dtype, 3.0)
    if soft:
        targets = rng.random((B, K)).astype(dtype)
        targets /= targets.sum(axis=1, keepdims=True)
        t_targets = torch.tensor(targets, dtype=TORCH_DTYPE[dtype])
    else:
        targets = rng.integers(0, K, B)
        t_targets = torch.tensor(targets)
    loss, cache = cross_entropy_forward(logits, targets, smoothing)
    dlogits = cross_entropy_backward(cache)
    t = torch_leaves([logits], dtype)
    t_loss = Fn.cross_entropy(t[0], t_targets, label_smoothing=smoothing)
    compare("cross_entropy", loss, [dlogits], t_loss, t, np.ones(()), dtype, ["logits"])
