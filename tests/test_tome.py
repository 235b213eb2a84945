"""Token merging (ToMe): the matching and the merge against a PyTorch re-implementation of ToMe's own
code, the merge's backward against finite differences (matching fixed), the whole model with ToMe
against a PyTorch ViT with ToMe's timm patch (float64, 1e-9), token counts, r = 0, bad r.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinyvit import VisionTransformer
from tinyvit.layers.block import block_backward, block_forward
from tinyvit.layers.tome import (size_bias, tome_match, tome_max_r, tome_merge_backward, tome_merge_forward,
                                 tome_token_counts, weighted_mean_pool_backward, weighted_mean_pool_forward)
from tests.strategies import block_param_shapes
from tests.tolerances import FD_TOLERANCE, TOLERANCES, assert_close
from tests.torch_twin import torch_params


def numeric_grad(f, x, dout, step=1e-6):
    """d/dx of sum(f() * dout) by central differences, perturbing ``x`` (float64) in place and restoring it."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    assert np.shares_memory(flat, x)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + step
        plus = np.sum(f() * dout)
        flat[i] = orig - step
        minus = np.sum(f() * dout)
        flat[i] = orig
        gflat[i] = (plus - minus) / (2 * step)
    return grad


# ---------------------------------------------------------------- ToMe's code, in PyTorch
def torch_bipartite_soft_matching(metric, r, class_token=True, distill_token=False):
    """ToMe's ``tome/merge.py: bipartite_soft_matching`` (Bolya et al.), as published."""
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)
    return merge


def torch_merge_wavg(merge, x, size=None):
    """ToMe's ``merge_wavg``."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def torch_tome_vit(x, p, c, r):
    """A pre-norm, class-token ViT with ToMe's timm patch (``ToMeBlock``/``ToMeAttention``, prop_attn on)."""
    x = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=c.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + p["pos_embed"]
    size = None
    for i in range(c.depth):
        g = lambda k: p[f"blocks.{i}.{k}"]  # noqa: E731
        h = F.layer_norm(x, (c.dim,), g("norm1.weight"), g("norm1.bias"), c.layer_norm_eps)
        B, N, D = h.shape
        qkv = F.linear(h, g("attn.qkv.weight"), g("attn.qkv.bias")).reshape(B, N, 3, c.heads, D // c.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D // c.heads)
        if size is not None:
            att = att + size.log()[:, None, None, :, 0]
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
        x = x + F.linear(y, g("attn.proj.weight"), g("attn.proj.bias"))
        if r > 0:
            x, size = torch_merge_wavg(torch_bipartite_soft_matching(k.mean(1), r), x, size)
        h = F.layer_norm(x, (c.dim,), g("norm2.weight"), g("norm2.bias"), c.layer_norm_eps)
        x = x + F.linear(F.gelu(F.linear(h, g("mlp.fc1.weight"), g("mlp.fc1.bias"))), g("mlp.fc2.weight"),
                         g("mlp.fc2.bias"))
    x = F.layer_norm(x, (c.dim,), p["norm.weight"], p["norm.bias"], c.layer_norm_eps)
    return F.linear(x[:, 0], p["head.weight"], p["head.bias"])


# ---------------------------------------------------------------- the layer
@pytest.mark.parametrize("tokens,r", [(11, 3), (12, 5), (17, 8), (9, 0)])
def test_match_and_merge_equal_tomes_code(tokens, r):
    rng = np.random.default_rng(tokens)
    metric, x = rng.standard_normal((3, tokens, 6)), rng.standard_normal((3, tokens, 5))
    size = rng.integers(1, 4, (3, tokens, 1)).astype(np.float64)
    out, cache = tome_merge_forward(x, size, tome_match(metric, r, num_prefix=1))
    size_out = cache.size_out
    merge = torch_bipartite_soft_matching(torch.tensor(metric), r)
    xt = torch.tensor(x, requires_grad=True)
    ref, ref_size = torch_merge_wavg(merge, xt, torch.tensor(size))
    assert out.shape == (3, tokens - r, 5)
    assert_close("merged x", out, ref.detach().numpy(), **TOLERANCES["float64"])
    assert_close("merged size", size_out, ref_size.numpy(), **TOLERANCES["float64"])
    dout = rng.standard_normal(out.shape)
    ref.backward(torch.tensor(dout))
    assert_close("dx", tome_merge_backward(dout, cache), xt.grad.numpy(), **TOLERANCES["float64"])


def test_merge_backward_against_finite_differences_with_the_matching_fixed():
    rng = np.random.default_rng(0)
    x, size = rng.standard_normal((2, 13, 4)), rng.integers(1, 5, (2, 13, 1)).astype(np.float64)
    match = tome_match(rng.standard_normal((2, 13, 3)), 5, num_prefix=1)
    out, cache = tome_merge_forward(x, size, match)
    dout = rng.standard_normal(out.shape)
    expected = numeric_grad(lambda: tome_merge_forward(x, size, match)[0], x, dout)
    assert_close("dx", tome_merge_backward(dout, cache), expected, **FD_TOLERANCE)


def test_merge_is_a_linear_map_and_keeps_the_prefix_in_front():
    rng = np.random.default_rng(1)
    metric = rng.standard_normal((2, 14, 4))
    for prefix in (1, 2):
        match = tome_match(metric, 6, num_prefix=prefix)
        assert np.all(match.keep[:, :prefix] == np.arange(prefix))  # class (and distillation) token first
        assert np.all(np.sort(np.concatenate([match.keep, match.src], 1), 1) == np.arange(14))  # each token once
        assert not np.isin(match.src, np.arange(prefix)).any()  # prefix tokens never merged away
        assert not np.isin(match.src_dest, np.arange(prefix)).any()  # nor merged into
    x = rng.standard_normal((2, 14, 3))
    out, cache = tome_merge_forward(x, None, match)
    size = cache.size_out
    assert size.sum(axis=(1, 2)).tolist() == [14.0, 14.0]  # sizes count the original tokens
    np.testing.assert_allclose((out * size).sum(1), x.sum(1), rtol=1e-12)  # size-weighted: the total is kept


def test_weighted_mean_pool_against_finite_differences():
    rng = np.random.default_rng(2)
    x, size = rng.standard_normal((2, 6, 4)), rng.integers(1, 5, (2, 6, 1)).astype(np.float64)
    out, cache = weighted_mean_pool_forward(x, size, 1)
    np.testing.assert_allclose(out, (x[:, 1:] * size[:, 1:]).sum(1) / size[:, 1:].sum(1), rtol=1e-12)
    dout = rng.standard_normal(out.shape)
    expected = numeric_grad(lambda: weighted_mean_pool_forward(x, size, 1)[0], x, dout)
    assert_close("dx", weighted_mean_pool_backward(dout, cache), expected, **FD_TOLERANCE)


@pytest.mark.parametrize("norm_first", [True, False])
def test_block_with_tome_against_finite_differences(norm_first):
    """The whole block with a merge and a size bias; the matching is recomputed at every
    perturbation, and a 1e-6 step does not change it on these random inputs."""
    rng = np.random.default_rng(3)
    B, N, D, NH = 2, 9, 8, 2
    x = rng.standard_normal((B, N, D))
    p = {k: rng.standard_normal(s) * (0.5 if "norm" not in k else 1) for k, s in block_param_shapes(D, 12).items()}
    size = rng.integers(1, 4, (B, N, 1)).astype(np.float64)
    fwd = lambda: block_forward(x, p, NH, 1e-6, norm_first, tome_r=3, size=size)  # noqa: E731
    out, cache = fwd()
    assert out.shape == (B, N - 3, D) and cache.size.shape == (B, N - 3, 1)
    dout = rng.standard_normal(out.shape)
    dx, grads = block_backward(dout, cache)
    assert_close("dx", dx, numeric_grad(lambda: fwd()[0], x, dout), **FD_TOLERANCE)
    for key in ("attn.qkv.weight", "attn.proj.weight", "norm2.weight", "mlp.fc1.weight"):
        assert_close(key, grads[key], numeric_grad(lambda: fwd()[0], p[key], dout), **FD_TOLERANCE)


# ---------------------------------------------------------------- the model
def small(**kw):
    args = dict(image_size=12, patch_size=2, num_classes=5, dim=16, depth=3, heads=4, mlp_dim=24, channels=1,
                dtype="float64", seed=0)
    args.update(kw)
    return VisionTransformer(**args)


def test_model_with_tome_equals_pytorch_tome_vit():
    m = small(tome_r=5)
    x = np.random.default_rng(4).standard_normal((3, 1, 12, 12))
    logits = m.forward(x)
    dlogits = np.random.default_rng(5).standard_normal(logits.shape)
    m.backward(dlogits)
    p = torch_params(m.state_dict())
    ref = torch_tome_vit(torch.tensor(x), p, m.config, 5)
    assert_close("logits", logits, ref.detach().numpy(), **TOLERANCES["float64"])
    ref.backward(torch.tensor(dlogits))
    for key, value in p.items():
        assert_close(key, m.grads[key], value.grad.numpy(), **TOLERANCES["float64"])


@pytest.mark.parametrize("pool,distilled", [("mean", False), ("cls", True)])
def test_model_with_tome_against_finite_differences(pool, distilled):
    m = small(tome_r=4, pool=pool, distilled=distilled, depth=2)
    x = np.random.default_rng(6).standard_normal((2, 1, 12, 12))
    dlogits = np.random.default_rng(7).standard_normal((2, 5))
    m.forward(x)
    dx = m.backward(dlogits)
    assert_close("dx", dx, numeric_grad(lambda: m.forward(x), x, dlogits), **FD_TOLERANCE)
    for key in ("blocks.1.attn.qkv.weight", "pos_embed", "head.bias"):
        assert_close(key, m.grads[key], numeric_grad(lambda: m.forward(x), m.params[key], dlogits), **FD_TOLERANCE)


def test_token_count_after_each_block_as_predicted():
    m = small(tome_r=5, depth=4, image_size=16)  # 1 + 64 tokens
    m.forward(np.zeros((2, 1, 16, 16)))
    seen = [a.shape[-1] for a in m.attention_maps()]  # tokens entering each block
    assert seen == m.config.token_counts()[:-1] == [65, 60, 55, 50]
    assert tome_token_counts(65, 5, 4) == [60, 55, 50, 45]


def test_tome_r0_is_the_model_exactly_and_works_off_the_shelf():
    m = small(dtype="float32")
    x = np.random.default_rng(8).standard_normal((4, 1, 12, 12)).astype(np.float32)
    plain = m.forward(x)
    m.set_tome(6)
    merged = m.forward(x)
    assert merged.shape == plain.shape and not np.array_equal(merged, plain)
    m.set_tome(0)
    assert np.array_equal(m.forward(x), plain)


def test_largest_r_and_the_error_that_names_it():
    # 37 tokens, 1 prefix, 3 blocks: r <= 18, (36 - r) // 2, (36 - 2r) // 2 -> 9
    assert tome_max_r(37, 1, 3) == 9
    small(tome_r=9)
    with pytest.raises(ValueError, match=r"tome_r=10 merges more than half of the tokens of block 2.*largest "
                                         r"tome_r for this 3-block model with 37 tokens is 9"):
        small(tome_r=10)
    m = small()
    with pytest.raises(ValueError, match="largest tome_r"):
        m.set_tome(40)
    assert m.config.tome_r == 0  # unchanged
    with pytest.raises(ValueError, match=r"largest r here is 2"):
        tome_match(np.ones((1, 6, 2)), 3, num_prefix=1)
    with pytest.raises(ValueError, match="tome_r must be an int >= 0"):
        small(tome_r=-1)


def test_size_bias_is_log_size_per_key():
    size = np.array([[[1.0], [2.0], [4.0]]])
    np.testing.assert_allclose(size_bias(size), np.log([[[[1.0, 2.0, 4.0]]]]))


def test_tome_patch_dropout_and_gates_run_on_strict_arrays():
    """The CuPy stand-in (tests/strict_array.py): no host round-trip in the matching, the merge, the
    weighted pool, patch dropout or the gates, forward or backward."""
    from tinyvit.backend import Backend
    from tinyvit.layers.loss import softmax_cross_entropy
    from tests.strict_array import StrictArray, strict_xp

    strict = Backend("strict", strict_xp)
    for pool in ("cls", "mean"):
        m = VisionTransformer(image_size=12, patch_size=2, num_classes=5, dim=16, depth=2, heads=4, mlp_dim=24,
                              channels=1, pool=pool, tome_r=4, patch_drop_rate=0.25, backend=strict, dtype="float32")
        m.set_head_gates({1: [1.0, 0.0, 1.0, 1.0]})
        x = strict.asarray(np.random.default_rng(0).standard_normal((3, 1, 12, 12)).astype("float32"))
        for train in (True, False):
            logits = m.forward(x, train=train)
            _, dlogits = softmax_cross_entropy(logits, strict.asarray(np.array([0, 1, 2])))
            dx = m.backward(dlogits)
            assert isinstance(logits, StrictArray) and isinstance(dx, StrictArray)
            assert all(isinstance(g, StrictArray) for g in m.grads.values())
            assert isinstance(m.gate_grads[1], StrictArray) and m.gate_grads[1].shape == (4,)


def test_training_with_tome_and_patch_dropout_saves_them(tmp_path):
    """tinyvit train --tome-r / --patch-drop-rate: a short run trains (loss finite, weights move) and the
    checkpoint's config carries both, so the loaded model merges the same way."""
    from tinyvit.training.train import TrainConfig, load_model, train

    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, images=rng.integers(0, 255, (64, 8, 8), dtype=np.uint8), labels=np.arange(64) % 4)
    cfg = TrainConfig(data=str(path), patch_size=2, dim=16, depth=2, heads=2, mlp_dim=16, epochs=2, batch_size=16,
                      warmup_epochs=0.5, tome_r=4, patch_drop_rate=0.25, out=str(tmp_path / "run"), mixup=0.0)
    s = train(cfg, progress=False)
    assert s["finished"] and not s["skipped_steps"]
    loaded = load_model(s["checkpoint"])
    assert loaded.config.tome_r == 4 and loaded.config.patch_drop_rate == 0.25
    assert loaded.config.token_counts() == [17, 13, 9]
    # tinyvit eval --tome-r: ToMe on a trained checkpoint from the command line; too large an r is named
    from tinyvit.cli import main
    assert main(["eval", "--weights", s["checkpoint"], "--tome-r", "2", "--data", str(path)]) == 0
    assert main(["eval", "--weights", s["checkpoint"], "--tome-r", "9", "--data", str(path)]) == 1


def test_flop_counter_reproduces_tomes_published_gflops():
    """tinyvit.flops counts ToMe's shrinking blocks (and pruned heads, and patch dropout in training); it
    reproduces the GFLOPs of ToMe's DeiT table: DeiT-S 4.6 / 3.4 / 2.7 at r = 0 / 8 / 13, DeiT-Ti
    1.3 / 0.9 / 0.8 at r = 0 / 8 / 12 (the paper rounds to 0.1)."""
    from tinyvit.benchmark import flops
    from tinyvit.model import ViTConfig

    for name, published in (("vit_s16", {0: 4.6, 8: 3.4, 13: 2.7}), ("vit_ti16", {0: 1.3, 8: 0.9, 12: 0.8})):
        for r, gmacs in published.items():
            got = flops.forward_macs(ViTConfig(**flops.PRESETS[name], tome_r=r)) / 1e9
            assert abs(got - gmacs) <= 0.05 + 1e-9, (name, r, got, gmacs)
    base = ViTConfig(**flops.PRESETS["vit_s16"])
    pruned = ViTConfig(**flops.PRESETS["vit_s16"], block_heads=(3,) * 12)
    full, half = flops.macs_by_layer(base), flops.macs_by_layer(pruned)
    assert half["qkv"] * 2 == full["qkv"] and half["attn_scores"] * 2 == full["attn_scores"]
    assert half["fc1"] == full["fc1"]
    assert flops.count_params(pruned) < flops.count_params(base)
    dropped = ViTConfig(**flops.PRESETS["vit_s16"], patch_drop_rate=0.5)
    assert flops.forward_macs(dropped) == flops.forward_macs(base)  # evaluation: every patch
    assert flops.train_step_flops(dropped) < 0.55 * flops.train_step_flops(base)  # training: 99 of 197 tokens
