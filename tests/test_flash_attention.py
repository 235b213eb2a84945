"""FlashAttention's tiled algorithm (tinyvit/layers/flash_attention.py) against plain attention,
finite differences, PyTorch and the strict (CuPy-like) arrays.

Tolerances: float64 flash equals plain attention to 1e-12 relative (max |a - b| / max |b|,
per tensor: the two differ only in summation order and in exp(S - m) exp(m - L) vs
exp(S - L)); float32 flash against float64 plain within the float32 table of
tests/tolerances.py; the whole flash model against the PyTorch twin to 1e-10 absolute.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyvit import VisionTransformer, softmax_cross_entropy
from tinyvit.backend import Backend
from tinyvit.gradcheck import assert_backward
from tinyvit.layers.attention import attention_backward, attention_forward
from tinyvit.layers.flash_attention import (draw_dropout_seed, dropout_keep_mask, dropout_keep_tile,
                                            flash_attention_backward, flash_attention_forward, flash_core_backward,
                                            flash_core_forward, flash_probabilities)
from tests.strict_array import StrictArray, strict_xp
from tests.test_model_twin import compare_with_twin, injected_masks, perturbed_model
from tests.tolerances import FD_STEP, FD_TOLERANCE, TOLERANCES, assert_close

REL = 1e-12  # the bound for float64 flash vs plain


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(float(np.max(np.abs(b))), 1e-300))


def weights(rng, D, dtype="float64", bias=True):
    w = [rng.standard_normal((3 * D, D)) * 0.4, rng.standard_normal(3 * D) if bias else None,
         rng.standard_normal((D, D)) * 0.3, rng.standard_normal(D)]
    return [None if a is None else a.astype(dtype) for a in w]


def both(x, w, NH, block, dout, p=0.0, mask=None):
    """Plain and flash attention, forward and backward, on the same input and keep-mask."""
    train = mask is not None
    out_p, c_p = attention_forward(x, *w, NH, p, train, attn_mask=mask)
    out_f, c_f = flash_attention_forward(x, *w, NH, block, p, train, attn_mask=mask)
    return (out_p, *attention_backward(dout, c_p)), (out_f, *flash_attention_backward(dout, c_f)), c_f


NAMES = ("out", "dx", "dqkv_w", "dqkv_b", "dproj_w", "dproj_b")


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), N=st.integers(1, 40), NH=st.sampled_from([1, 2, 4]), hs=st.integers(1, 6),
       block=st.integers(1, 48), dropout=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_flash_equals_plain_float64(B, N, NH, hs, block, dropout, bias, seed):
    """Forward and every gradient, any tile size (1, dividing N or not, larger than N), with and
    without attention dropout (the same keep-mask injected into both)."""
    rng = np.random.default_rng(seed)
    D = NH * hs
    x = rng.standard_normal((B, N, D)) * 2
    w = weights(rng, D, bias=bias)
    dout = rng.standard_normal((B, N, D))
    mask = rng.random((B, NH, N, N)) > 0.3 if dropout else None
    plain, flash, _ = both(x, w, NH, block, dout, 0.3 if dropout else 0.0, mask)
    for name, a, b in zip(NAMES, flash, plain):
        if b is None:
            assert a is None, name
            continue
        assert rel_err(a, b) <= REL, (name, rel_err(a, b))


def test_flash_float32_within_the_table():
    rng = np.random.default_rng(0)
    B, N, NH, D = 2, 50, 4, 32
    x = rng.standard_normal((B, N, D))
    w = weights(rng, D)
    dout = rng.standard_normal((B, N, D))
    plain64, _, _ = both(x, w, NH, 16, dout)
    f32 = [None if a is None else a.astype("float32") for a in w]
    out, cache = flash_attention_forward(x.astype("float32"), *f32, NH, 16)
    grads = flash_attention_backward(dout.astype("float32"), cache)
    for name, a, b in zip(NAMES, (out, *grads), plain64):
        assert a.dtype == np.float32, name
        assert_close(f"flash float32 {name}", a, b, **TOLERANCES["float32"])


def test_flash_core_backward_against_finite_differences():
    """dq, dk, dv of the tiled core (3 x 3 tiles over 7 tokens: a ragged last tile), with and
    without an injected dropout mask, against central differences (tinyvit.gradcheck, float64)."""
    rng = np.random.default_rng(1)
    B, NH, N, hs, block = 1, 2, 7, 3, 3
    q, k, v = (rng.standard_normal((B, NH, N, hs)) for _ in range(3))
    mask = rng.random((B, NH, N, N)) > 0.25
    for attn_mask in (None, mask):
        def forward(q, k, v):
            return flash_core_forward(q, k, v, 0.7, block, 0.25, attn_mask is not None, attn_mask=attn_mask)
        assert_backward(forward, flash_core_backward, [q, k, v], names=["q", "k", "v"], eps=FD_STEP, **FD_TOLERANCE)


def test_cache_holds_nothing_n_by_n():
    """The point of flash: no (B, NH, N, N) array survives the forward (L is (B, NH, N, 1))."""
    rng = np.random.default_rng(2)
    N = 33
    x = rng.standard_normal((2, N, 8))
    _, cache = flash_attention_forward(x, *weights(rng, 8), 2, 8)
    arrays = [a for a in cache.core if hasattr(a, "shape")]
    assert arrays and all(a.shape[-2:] != (N, N) for a in arrays)
    assert cache.core.lse.shape == (2, 2, N, 1)


def test_dropout_mask_comes_from_the_seed_and_position_only():
    """The mask a forward used is regenerated exactly from its seed (the backward relies on it),
    is the same whatever the tile size, drops about p, and flash with it equals plain attention
    given the same mask."""
    rng = np.random.default_rng(3)
    B, N, NH, D, p = 2, 29, 2, 8, 0.25
    x = rng.standard_normal((B, N, D))
    w = weights(rng, D)
    dout = rng.standard_normal((B, N, D))
    results = []
    for block in (4, 7, 64):
        gen = np.random.default_rng(11)
        out, cache = flash_attention_forward(x, *w, NH, block, p, True, gen)
        results.append((out, *flash_attention_backward(dout, cache), cache.core.seed))
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
    seed = results[0][-1]
    assert seed.dtype == np.uint64 and seed.shape == (1,)
    mask = dropout_keep_mask(seed, (B, NH, N, N), p)
    assert abs(mask.mean() - (1 - p)) < 0.03
    tile = dropout_keep_tile(seed, (B, NH, N, N), slice(5, 12), slice(20, 29), N, p)
    np.testing.assert_array_equal(tile, mask[:, :, 5:12, 20:29])
    out_p, c_p = attention_forward(x, *w, NH, p, True, attn_mask=mask)
    for name, a, b in zip(NAMES, results[0], (out_p, *attention_backward(dout, c_p))):
        assert rel_err(a, b) <= REL, name
    # another seed, another mask
    other = draw_dropout_seed(np.random.default_rng(12))
    assert (dropout_keep_mask(other, (B, NH, N, N), p) != mask).mean() > 0.2


def test_attention_maps_are_recomputed_for_flash():
    kw = dict(image_size=12, patch_size=4, num_classes=3, dim=12, depth=2, heads=3, mlp_dim=16, dtype="float64")
    plain = VisionTransformer(**kw)
    flash = VisionTransformer(**kw, attn_impl="flash", attn_block=4)
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12))
    np.testing.assert_allclose(flash.forward(x), plain.forward(x), rtol=0, atol=1e-13)
    for a, b in zip(flash.attention_maps(), plain.attention_maps()):
        assert a.shape == (2, 3, 10, 10)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-14)
    cache = flash._cache.blocks[0].attn.core
    np.testing.assert_allclose(flash_probabilities(cache).sum(-1), 1.0, atol=1e-14)


@pytest.mark.parametrize("variant", [
    dict(),
    dict(pool="mean", norm_first=False, qkv_bias=False, attn_block=1),
    dict(distilled=True, attn_block=5),
], ids=["prenorm-cls", "postnorm-mean-block1", "distilled-block5"])
def test_whole_flash_model_matches_pytorch(variant):
    kw = dict(image_size=(8, 12), patch_size=4, num_classes=4, dim=16, depth=2, heads=2, mlp_dim=20)
    m = perturbed_model(**{**kw, "attn_impl": "flash", "attn_block": 3, **variant})
    compare_with_twin(m, np.random.default_rng(1).standard_normal((2, 3, 8, 12)))


def test_whole_flash_model_in_training_mode_matches_pytorch():
    m = perturbed_model(image_size=8, patch_size=4, num_classes=3, dim=8, depth=2, heads=2, mlp_dim=12,
                        dropout=0.2, attn_dropout=0.3, emb_dropout=0.1, drop_path_rate=0.5, attn_impl="flash",
                        attn_block=2)
    rng = np.random.default_rng(3)
    masks = injected_masks(m, rng)
    compare_with_twin(m, rng.standard_normal((4, 3, 8, 8)), masks=masks, train=True)


def test_flash_on_strict_arrays_draws_its_mask_on_the_device():
    """The strict stand-in for CuPy: forward, backward (dropout seed drawn on the device, the
    mask regenerated there) and attention_maps with no host round-trip, and the same numbers
    as NumPy with the same seed."""
    from tests.conftest import model_on

    strict = Backend("strict", strict_xp)
    kw = dict(image_size=8, patch_size=2, num_classes=5, dim=16, depth=2, heads=4, mlp_dim=24, dropout=0.2,
              attn_dropout=0.2, emb_dropout=0.2, drop_path_rate=0.3, dtype="float32", attn_impl="flash",
              attn_block=5, seed=4)
    m = model_on(strict, **kw)
    ref = VisionTransformer(**kw)
    x_host = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype("float32")
    labels = np.array([0, 1, 2])
    logits = m.forward(strict.asarray(x_host), train=True)
    loss, dlogits = softmax_cross_entropy(logits, labels)
    dx = m.backward(dlogits)
    assert isinstance(logits, StrictArray) and isinstance(dx, StrictArray)
    assert all(isinstance(g, StrictArray) for g in m.grads.values())
    assert all(isinstance(a, StrictArray) for a in m.attention_maps())
    ref_logits = ref.forward(x_host, train=True)
    _, ref_d = softmax_cross_entropy(ref_logits, labels)
    ref_dx = ref.backward(ref_d)
    assert_close("logits", strict_xp.to_host(logits), ref_logits, **TOLERANCES["float32"])
    assert_close("dx", strict_xp.to_host(dx), ref_dx, **TOLERANCES["float32"])


@pytest.mark.parametrize("block", [0, -3, 2.5, True, "64", None])
def test_bad_block_sizes_are_clear_errors(block):
    with pytest.raises(ValueError, match=r"attn_block \(the flash tile side\) must be an int >= 1, got"):
        VisionTransformer(image_size=8, patch_size=4, num_classes=2, dim=8, depth=1, heads=2, mlp_dim=8,
                          attn_impl="flash", attn_block=block)
    x = np.zeros((1, 3, 8))
    with pytest.raises(ValueError, match="attn_block"):
        flash_attention_forward(x, *weights(np.random.default_rng(0), 8), 2, block)


def test_unknown_attention_implementation_is_a_clear_error():
    with pytest.raises(ValueError, match=r"attn_impl must be one of \('plain', 'flash'"):
        VisionTransformer(image_size=8, patch_size=4, num_classes=2, dim=8, depth=1, heads=2, mlp_dim=8,
                          attn_impl="fast")
