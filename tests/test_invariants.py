"""Properties that need no oracle: softmax rows sum to 1, patching is a permutation and
unpatchify undoes it, attention without positions is permutation-equivariant over tokens,
eval-mode dropout is the identity, and no backward writes into its inputs or its dout."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyvit import VisionTransformer
from tinyvit.layers.attention import attention_backward, attention_forward, softmax_forward
from tinyvit.layers.block import block_backward, block_forward
from tinyvit.layers.patch_embed import patchify_forward, unpatchify
from tinyvit.layers.tokens import sincos_1d_table, sincos_2d_table
from tests import strategies as S

PROPERTY = settings(max_examples=30, deadline=None)


@PROPERTY
@given(S.batch, S.heads, S.tokens, S.seeds, st.sampled_from([1.0, 30.0, 1e4]))
def test_softmax_rows_sum_to_one_even_for_huge_scores(B, NH, N, seed, scale):
    x = np.random.default_rng(seed).standard_normal((B, NH, N, N)) * scale
    out, _ = softmax_forward(x)
    assert np.all(np.isfinite(out)) and np.all(out >= 0)
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=0, atol=1e-12)


@PROPERTY
@given(S.batch, S.channels, S.patch, S.grid, S.grid, S.seeds)
def test_unpatchify_inverts_patchify_and_patches_are_a_permutation(B, C, P, gh, gw, seed):
    x = np.random.default_rng(seed).standard_normal((B, C, gh * P, gw * P))
    patches, cache = patchify_forward(x, P)
    assert patches.shape == (B, gh * gw, C * P * P)
    assert np.array_equal(unpatchify(patches, gh, gw, P), x)
    assert np.array_equal(np.sort(patches.ravel()), np.sort(x.ravel()))
    # patch (row i, col j) holds the pixels x[:, :, iP:(i+1)P, jP:(j+1)P] in (c, p1, p2) order
    i, j = gh - 1, gw - 1
    assert np.array_equal(patches[:, i * gw + j], x[:, :, i * P:(i + 1) * P, j * P:(j + 1) * P].reshape(B, -1))


@PROPERTY
@given(S.batch, S.tokens, S.heads, S.head_size, S.seeds, st.booleans())
def test_attention_and_block_are_permutation_equivariant(B, N, NH, hs, seed, norm_first):
    rng = np.random.default_rng(seed)
    D = NH * hs
    x = rng.standard_normal((B, N, D))
    w = [rng.standard_normal(s) * 0.3 for s in [(3 * D, D), (3 * D,), (D, D), (D,)]]
    perm = rng.permutation(N)
    out, _ = attention_forward(x, *w, NH)
    out_perm, _ = attention_forward(x[:, perm], *w, NH)
    np.testing.assert_allclose(out_perm, out[:, perm], rtol=1e-10, atol=1e-12)
    p = {k: rng.standard_normal(s) * 0.3 for k, s in S.block_param_shapes(D, 5).items()}
    out, _ = block_forward(x, p, NH, 1e-6, norm_first)
    out_perm, _ = block_forward(x[:, perm], p, NH, 1e-6, norm_first)
    np.testing.assert_allclose(out_perm, out[:, perm], rtol=1e-10, atol=1e-12)


@PROPERTY
@given(S.batch, S.tokens, S.heads, S.head_size, S.seeds)
def test_backward_never_writes_its_inputs_or_dout(B, N, NH, hs, seed):
    rng = np.random.default_rng(seed)
    D = NH * hs
    x = rng.standard_normal((B, N, D))
    p = {k: rng.standard_normal(s) for k, s in S.block_param_shapes(D, 5).items()}
    kept = (x.copy(), {k: v.copy() for k, v in p.items()})
    out, cache = block_forward(x, p, NH, 1e-6, True)
    dout = rng.standard_normal(out.shape)
    dout_kept = dout.copy()
    block_backward(dout, cache)
    attention_backward(dout, attention_forward(x, p["attn.qkv.weight"], None, p["attn.proj.weight"], None, NH)[1])
    assert np.array_equal(x, kept[0]) and np.array_equal(dout, dout_kept)
    assert all(np.array_equal(p[k], kept[1][k]) for k in p)


def test_model_backward_never_writes_its_input_or_dlogits():
    m = VisionTransformer(image_size=8, patch_size=4, num_classes=3, dim=8, depth=2, heads=2, mlp_dim=8,
                          dtype="float64")
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8))
    x_kept = x.copy()
    d = np.random.default_rng(1).standard_normal((2, 3))
    d_kept = d.copy()
    m.forward(x)
    m.backward(d)
    assert np.array_equal(x, x_kept) and np.array_equal(d, d_kept)


def test_eval_mode_is_deterministic_and_ignores_dropout_rates():
    kw = dict(image_size=8, patch_size=4, num_classes=3, dim=8, depth=2, heads=2, mlp_dim=8, seed=4)
    m = VisionTransformer(dropout=0.5, attn_dropout=0.5, emb_dropout=0.5, drop_path_rate=0.5, **kw)
    plain = VisionTransformer(**kw)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype("float32")
    state = m.rng.bit_generator.state
    assert np.array_equal(m.forward(x), plain.forward(x))
    assert m.rng.bit_generator.state == state  # evaluation draws nothing
    assert not np.array_equal(m.forward(x, train=True), plain.forward(x))


def test_attention_maps_are_probabilities():
    m = VisionTransformer(image_size=8, patch_size=2, num_classes=3, dim=8, depth=3, heads=2, mlp_dim=8)
    m.forward(np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype("float32"))
    maps = m.attention_maps()
    assert len(maps) == 3 and all(a.shape == (2, 2, 17, 17) for a in maps)
    assert all(np.allclose(a.sum(-1), 1.0, atol=1e-6) for a in maps)


def test_sincos_tables():
    t1 = sincos_1d_table(10, 8)
    assert np.allclose(t1[:, 0::2] ** 2 + t1[:, 1::2] ** 2, 1.0)  # each (sin, cos) pair lies on the circle
    assert np.allclose(t1[0, 0::2], 0.0) and np.allclose(t1[0, 1::2], 1.0)
    t2 = sincos_2d_table(3, 4, 16)
    assert t2.shape == (12, 16)
    # same column -> identical first half (the column code); same row -> identical second half
    assert np.allclose(t2[1, :8], t2[5, :8]) and np.allclose(t2[4, 8:], t2[7, 8:])


def test_refilling_the_image_buffer_before_backward_changes_nothing():
    """The caches own their data: a data loader that reuses its batch buffer gets the same gradients."""
    for patch_size, channels in [(4, 3), (1, 1)]:
        m = VisionTransformer(image_size=8, patch_size=patch_size, num_classes=3, dim=8, depth=1, heads=2,
                              mlp_dim=8, channels=channels, dtype="float64")
        x = np.random.default_rng(0).standard_normal((2, channels, 8, 8))
        d = np.random.default_rng(1).standard_normal((2, 3))
        m.forward(x.copy())
        m.backward(d)
        expected = {k: v.copy() for k, v in m.grads.items()}
        buffer = x.copy()
        m.forward(buffer)
        buffer[...] = 0.0  # the loader refills its buffer before the backward
        m.backward(d)
        for k in expected:
            np.testing.assert_array_equal(m.grads[k], expected[k], err_msg=k)
