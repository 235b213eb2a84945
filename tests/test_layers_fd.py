"""Every layer's backward against float64 central finite differences, with a random upstream gradient.

Each case gives: the inputs (float64 arrays, perturbed one element at a time), a forward
that maps them to one output, and the backward's gradients in the same order; the checker is
the public one, ``tinyvit.gradcheck.assert_backward`` (mode "full": every coordinate), so the
tool is proven by the ladder it serves (its own tests: tests/test_gradcheck.py).
Tolerance: FD_TOLERANCE (tests/tolerances.py): rtol 1e-6, atol 1e-8 at step 1e-6.
"""
import numpy as np
import pytest

from tinyvit.gradcheck import assert_backward
from tinyvit.layers.attention import attention_backward, attention_forward, softmax_backward, softmax_forward
from tinyvit.layers.block import BlockMasks, block_backward, block_forward
from tinyvit.layers.dropout import drop_path_backward, drop_path_forward, dropout_backward, dropout_forward
from tinyvit.layers.gelu import gelu_backward, gelu_forward
from tinyvit.layers.head import mean_pool_forward, pool_backward, token_pool_forward
from tinyvit.layers.layernorm import layernorm_backward, layernorm_forward
from tinyvit.layers.linear import linear_backward, linear_forward
from tinyvit.layers.loss import cross_entropy_backward, cross_entropy_forward
from tinyvit.layers.mlp import mlp_backward, mlp_forward
from tinyvit.layers.patch_embed import patch_embed_backward, patch_embed_forward, patchify_backward, patchify_forward
from tinyvit.layers.tokens import add_pos_embed_backward, add_pos_embed_forward, prepend_tokens_backward, prepend_tokens_forward
from tests.strategies import block_param_shapes
from tests.tolerances import FD_STEP, FD_TOLERANCE

B, N, D, NH, F = 2, 5, 8, 2, 12


def rand(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


def check(forward, backward, inputs, names, seed=0):
    """``forward(*inputs) -> (out, cache)``; ``backward(dout, cache) -> grads`` aligned with ``inputs``;
    a random upstream gradient (seeded); every coordinate by central differences."""
    assert_backward(forward, backward, inputs, names=names, seed=seed, mode="full", eps=FD_STEP, **FD_TOLERANCE)


def test_linear():
    rng = np.random.default_rng(1)
    check(linear_forward, linear_backward, [rand(rng, B, N, D), rand(rng, F, D), rand(rng, F)], ["x", "w", "b"])


def test_linear_without_bias():
    rng = np.random.default_rng(2)
    check(lambda x, w: linear_forward(x, w, None), lambda d, c: linear_backward(d, c)[:2],
          [rand(rng, 3, D), rand(rng, F, D)], ["x", "w"])


def test_patchify():
    rng = np.random.default_rng(3)
    check(lambda x: patchify_forward(x, 2), lambda d, c: (patchify_backward(d, c),), [rand(rng, 2, 3, 4, 6)], ["x"])


def test_patch_embed():
    rng = np.random.default_rng(4)
    check(patch_embed_forward, patch_embed_backward, [rand(rng, 2, 3, 4, 6), rand(rng, D, 3, 2, 2), rand(rng, D)],
          ["x", "w", "b"])


def test_prepend_tokens_and_pos_embed():
    rng = np.random.default_rng(5)
    check(prepend_tokens_forward, lambda d, c: prepend_tokens_backward(d, c),
          [rand(rng, B, N, D), rand(rng, 1, 1, D), rand(rng, 1, 1, D)], ["x", "cls", "dist"])
    check(add_pos_embed_forward, add_pos_embed_backward, [rand(rng, B, N, D), rand(rng, 1, N, D)], ["x", "pos"])


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.1])
def test_layernorm(eps):
    rng = np.random.default_rng(6)
    check(lambda x, w, b: layernorm_forward(x, w, b, eps), layernorm_backward,
          [rand(rng, B, N, D, scale=3.0) + 1.0, rand(rng, D), rand(rng, D)], ["x", "w", "b"])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    rng = np.random.default_rng(7)
    check(lambda x: gelu_forward(x, approximate), lambda d, c: (gelu_backward(d, c),), [rand(rng, B, N, D, scale=2.0)],
          ["x"])


def test_dropout_and_drop_path_with_injected_masks():
    rng = np.random.default_rng(8)
    mask = rng.random((B, N, D)) > 0.3
    check(lambda x: dropout_forward(x, 0.3, True, mask=mask), lambda d, c: (dropout_backward(d, c),),
          [rand(rng, B, N, D)], ["x"])
    path_mask = np.array([True, False]).reshape(B, 1, 1)
    check(lambda x: drop_path_forward(x, 0.25, True, mask=path_mask), lambda d, c: (drop_path_backward(d, c),),
          [rand(rng, B, N, D)], ["x"])


def test_softmax():
    rng = np.random.default_rng(9)
    check(softmax_forward, lambda d, c: (softmax_backward(d, c),), [rand(rng, B, NH, N, N, scale=3.0)], ["x"])


@pytest.mark.parametrize("with_dropout", [False, True])
def test_attention(with_dropout):
    rng = np.random.default_rng(10)
    mask = rng.random((B, NH, N, N)) > 0.2 if with_dropout else None

    def forward(x, qkv_w, qkv_b, proj_w, proj_b):
        return attention_forward(x, qkv_w, qkv_b, proj_w, proj_b, NH, 0.2, with_dropout, attn_mask=mask)

    check(forward, attention_backward,
          [rand(rng, B, N, D), rand(rng, 3 * D, D, scale=0.5), rand(rng, 3 * D), rand(rng, D, D), rand(rng, D)],
          ["x", "qkv_w", "qkv_b", "proj_w", "proj_b"])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mlp(approximate):
    rng = np.random.default_rng(11)
    masks = (rng.random((B, N, F)) > 0.1, rng.random((B, N, D)) > 0.1)

    def forward(x, w1, b1, w2, b2):
        return mlp_forward(x, w1, b1, w2, b2, 0.1, True, approximate=approximate, masks=masks)

    check(forward, mlp_backward, [rand(rng, B, N, D), rand(rng, F, D), rand(rng, F), rand(rng, D, F), rand(rng, D)],
          ["x", "fc1_w", "fc1_b", "fc2_w", "fc2_b"])


BLOCK_SHAPES = block_param_shapes(D, F)


@pytest.mark.parametrize("norm_first", [True, False], ids=["prenorm", "postnorm"])
def test_block(norm_first):
    rng = np.random.default_rng(12)
    keys = list(BLOCK_SHAPES)
    params = [rand(rng, *BLOCK_SHAPES[k], scale=0.5) + (1.0 if "norm" in k and "weight" in k else 0.0) for k in keys]
    masks = BlockMasks(attn=rng.random((B, NH, N, N)) > 0.1, proj=rng.random((B, N, D)) > 0.1,
                       mlp_hidden=rng.random((B, N, F)) > 0.1, mlp_out=rng.random((B, N, D)) > 0.1,
                       path1=np.array([True, False]).reshape(B, 1, 1), path2=np.array([True, True]).reshape(B, 1, 1))

    def forward(x, *values):
        return block_forward(x, dict(zip(keys, values)), NH, 1e-6, norm_first, 0.1, 0.1, 0.1, "none", True,
                             masks=masks)

    def backward(dout, cache):
        dx, grads = block_backward(dout, cache)
        return [dx] + [grads[k] for k in keys]

    check(forward, backward, [rand(rng, B, N, D)] + params, ["x"] + keys)


def test_pools():
    rng = np.random.default_rng(13)
    check(lambda x: token_pool_forward(x, 0), lambda d, c: (pool_backward(d, c),), [rand(rng, B, N, D)], ["x cls"])
    check(lambda x: token_pool_forward(x, 1), lambda d, c: (pool_backward(d, c),), [rand(rng, B, N, D)], ["x dist"])
    check(lambda x: mean_pool_forward(x, 2), lambda d, c: (pool_backward(d, c),), [rand(rng, B, N, D)], ["x mean"])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("soft", [False, True])
def test_cross_entropy(smoothing, soft):
    rng = np.random.default_rng(14)
    K = 5
    if soft:
        targets = rng.random((4, K))
        targets /= targets.sum(axis=1, keepdims=True)
    else:
        targets = np.array([0, 3, 4, 1])
    check(lambda z: cross_entropy_forward(z, targets, smoothing),
          lambda d, c: (cross_entropy_backward(c, float(d)),), [rand(rng, 4, K, scale=2.0)], ["logits"])
