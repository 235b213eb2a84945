"""2D rotary position embedding (tinyvit/layers/rope.py): RoPE-ViT's axial and mixed variants.

Proven here, float64:
- every backward (rope, rope angles, attention with RoPE) against central finite differences
  (FD_TOLERANCE: rtol 1e-6, atol 1e-8 at step 1e-6);
- the layer against a PyTorch twin written from the paper (complex multiplication with
  ``torch.polar``, autograd for the gradients; TOLERANCES["float64"]: rtol 1e-9, atol 1e-10);
  the whole model against the twin is in tests/test_model_twin.py;
- against timm's own rotary code (``timm.layers.pos_embed_sincos``) where timm imports;
- RoPE's defining property: q.k depends on the two patches' offset only, not where they are;
- NumPy-free steps (the strict array), clear errors for bad input, the config through a checkpoint.
"""
import numpy as np
import pytest
import torch

from tinyvit import VisionTransformer, softmax_cross_entropy
from tinyvit.backend import Backend
from tinyvit.gradcheck import assert_backward
from tinyvit.layers.attention import attention_backward, attention_forward
from tinyvit.layers.rope import (rope_angles_backward, rope_angles_forward, rope_axial_freqs, rope_backward,
                                 rope_forward, rope_mixed_freqs, rope_positions)
from tests.conftest import model_on
from tests.strict_array import StrictArray, strict_xp
from tests.tolerances import FD_STEP, FD_TOLERANCE, TOLERANCES, assert_close
from tests.torch_twin import rope_apply, rope_axial_cis, rope_mixed_cis

B, NH, HS = 2, 2, 8
GH, GW = 2, 3  # a non-square grid: swapping x and y would show
NP = GH * GW


def check(forward, backward, inputs, names, seed=0):
    """``forward(*inputs) -> (out, cache)``; ``backward(dout, cache) -> grads`` aligned with ``inputs``;
    a random upstream gradient, every coordinate by central differences (tinyvit.gradcheck)."""
    assert_backward(forward, backward, inputs, names=names, seed=seed, mode="full", eps=FD_STEP, **FD_TOLERANCE)


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
@pytest.mark.parametrize("table_heads", [1, NH], ids=["shared", "per-head"])
def test_rope_backward_matches_finite_differences(num_prefix, table_heads):
    rng = np.random.default_rng(num_prefix)
    x = rng.standard_normal((B, NH, num_prefix + NP, HS))
    angles = rng.standard_normal((table_heads, NP, HS // 2)) * 2.0
    check(lambda x_, a_: rope_forward(x_, a_, num_prefix), rope_backward, [x, angles], ["x", "angles"])


def test_rope_angles_backward_matches_finite_differences():
    rng = np.random.default_rng(1)
    freqs = rng.standard_normal((2, NH, HS // 2))
    pos = rope_positions(GH, GW)
    check(lambda f: rope_angles_forward(f, pos), lambda d, c: (rope_angles_backward(d, c),), [freqs], ["freqs"])


def test_attention_with_rope_matches_finite_differences():
    """The attention backward turns dq and dk back and returns the angles' gradient as a sixth value."""
    rng = np.random.default_rng(2)
    D = NH * HS
    inputs = [rng.standard_normal((B, 1 + NP, D)), rng.standard_normal((3 * D, D)) * 0.3, rng.standard_normal(3 * D),
              rng.standard_normal((D, D)) * 0.3, rng.standard_normal(D), rng.standard_normal((NH, NP, HS // 2))]
    check(lambda x, qw, qb, pw, pb, a: attention_forward(x, qw, qb, pw, pb, NH, rope_angles=a, num_prefix=1),
          attention_backward, inputs, ["x", "qkv_w", "qkv_b", "proj_w", "proj_b", "angles"])


@pytest.mark.parametrize("kind", ["axial", "mixed"])
def test_rope_matches_the_papers_complex_form_in_pytorch(kind):
    """tinyvit's real-pair rotation = the paper's ``view_as_complex(x) * polar(1, angles)``, gradients included
    (for mixed: through the frequencies, as the paper's ``compute_mixed_cis`` differentiates them)."""
    rng = np.random.default_rng(3)
    T, depth, block = 1, 2, 1
    x = rng.standard_normal((B, NH, T + NP, HS))
    if kind == "axial":
        freqs = rope_axial_freqs(HS, 100.0)[:, 0]  # (2, hs/2), shared by the heads
        cis_t = rope_axial_cis(HS, GW, GH, 100.0)
        freqs_t = None
        angles, angle_cache = rope_angles_forward(freqs[:, None], rope_positions(GH, GW))
    else:
        all_freqs = rope_mixed_freqs(HS, NH, depth, 10.0, rng)  # (2, depth, NH, hs/2)
        freqs_t = torch.tensor(all_freqs.reshape(2, depth, -1), requires_grad=True)
        cis_t = rope_mixed_cis(freqs_t, GW, GH, NH)[block]  # (NH, Np, hs/2)
        angles, angle_cache = rope_angles_forward(all_freqs[:, block], rope_positions(GH, GW))
    out, cache = rope_forward(x, angles, T)
    dout = rng.standard_normal(out.shape)
    dx, dangles = rope_backward(dout, cache)

    xt = torch.tensor(x, requires_grad=True)
    out_t = torch.cat([xt[:, :, :T], rope_apply(xt[:, :, T:], cis_t)], dim=2)
    (out_t * torch.tensor(dout)).sum().backward()
    tol = TOLERANCES["float64"]
    assert_close("out", out, out_t.detach().numpy(), **tol)
    assert_close("dx", dx, xt.grad.numpy(), **tol)
    if kind == "mixed":
        dfreqs = rope_angles_backward(dangles, angle_cache)  # (2, NH, hs/2)
        assert_close("dfreqs", dfreqs, freqs_t.grad.reshape(2, depth, NH, -1)[:, block].numpy(), **tol)
        assert not np.any(freqs_t.grad.reshape(2, depth, NH, -1)[:, 1 - block].numpy()), "other block untouched"


def test_axial_frequencies_are_the_papers():
    """theta = 100: w_i = 100^(-4i/hs), x on the first hs/4 pairs, y on the rest; mixed at init has the same
    magnitudes, its two halves at right angles (direction phi, phi + pi/2), one phi per block and head."""
    f = rope_axial_freqs(16, 100.0)
    w = 100.0 ** (-np.arange(0, 16, 4) / 16)
    np.testing.assert_allclose(f[0, 0], np.r_[w, 0 * w], rtol=1e-15)
    np.testing.assert_allclose(f[1, 0], np.r_[0 * w, w], rtol=1e-15)
    m = rope_mixed_freqs(16, 3, 2, 10.0, np.random.default_rng(0))  # (2, depth, NH, hs/2)
    assert m.shape == (2, 2, 3, 8)
    mag = np.hypot(m[0], m[1])
    np.testing.assert_allclose(mag, np.broadcast_to(np.r_[10.0 ** (-np.arange(0, 16, 4) / 16)] * np.ones(2)[:, None],
                                                    (2, 4)).reshape(-1) * np.ones((2, 3, 1)), rtol=1e-12)
    first, second = m[..., 0], m[..., 4]  # pair 0 and pair hs/4 of each block and head: perpendicular
    np.testing.assert_allclose((first * second).sum(axis=0), 0.0, atol=1e-15)
    phi = np.arctan2(m[1, ..., 0], m[0, ..., 0])
    assert len(np.unique(np.round(phi, 9))) == 6, "a direction per block and head"


@pytest.mark.parametrize("kind", ["axial", "mixed"])
def test_scores_depend_only_on_the_offset_between_patches(kind):
    """RoPE's point: q_m . k_n after the turn is a function of (m - n) on the grid. Place one query and one
    key at every pair of cells with the same offset: the score is the same; the class token is untouched."""
    rng = np.random.default_rng(4)
    gh, gw = 4, 5
    pos = rope_positions(gh, gw)
    freqs = rope_axial_freqs(HS)[:, :1] if kind == "axial" else rope_mixed_freqs(HS, 1, 1, 10.0, rng)[:, 0]
    angles, _ = rope_angles_forward(freqs, pos)  # (1, Np, hs/2)
    q, k = rng.standard_normal(HS), rng.standard_normal(HS)
    n = gh * gw
    x = np.broadcast_to(np.stack([q, k]), (n, 2, HS)).transpose(1, 0, 2)[:, None]  # (2, 1, Np, hs): q, k everywhere
    x = np.concatenate([np.zeros((2, 1, 1, HS)) + 0.5, x], axis=2)  # a class token in front
    out, _ = rope_forward(np.ascontiguousarray(x), angles, 1)
    np.testing.assert_array_equal(out[:, :, 0], x[:, :, 0])
    scores = out[0, 0, 1:] @ out[1, 0, 1:].T  # (Np, Np)
    by_offset = {}
    for m_ in range(n):
        for n_ in range(n):
            offset = (pos[0, m_] - pos[0, n_], pos[1, m_] - pos[1, n_])
            by_offset.setdefault(offset, []).append(scores[m_, n_])
    spread = max(np.ptp(v) for v in by_offset.values())
    assert spread < 1e-12
    assert np.ptp([v[0] for v in by_offset.values()]) > 1e-3, "yet the score does change with the offset"
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13)  # a rotation


def test_rope_on_the_strict_array():
    """Forward and backward of the layer and of RoPE models (also with patch dropout) never leave the device."""
    rng = np.random.default_rng(5)
    xs = strict_xp.asarray(rng.standard_normal((B, NH, 1 + NP, HS)).astype("float32"))
    fs = strict_xp.asarray(rng.standard_normal((2, NH, HS // 2)).astype("float32"))
    ps = strict_xp.asarray(rope_positions(GH, GW).astype("float32"))
    angles, acache = rope_angles_forward(fs, ps)
    out, cache = rope_forward(xs, angles, 1)
    dx, dangles = rope_backward(out, cache)
    dfreqs = rope_angles_backward(dangles, acache)
    assert all(isinstance(a, StrictArray) for a in (angles, out, dx, dangles, dfreqs))
    strict = Backend("strict", strict_xp)
    for kind, drop in (("rope_axial", 0.0), ("rope_mixed", 0.0), ("rope_axial", 0.5), ("rope_mixed", 0.5)):
        m = model_on(strict, image_size=(8, 12), patch_size=4, num_classes=3, dim=16, depth=2, heads=2, mlp_dim=16,
                     pos_embed=kind, dtype="float32", attn_dropout=0.1, patch_drop_rate=drop)
        x = strict.asarray(rng.standard_normal((2, 3, 8, 12)).astype("float32"))
        loss, dlogits = softmax_cross_entropy(m.forward(x, train=True), np.array([0, 2]))
        m.backward(dlogits)
        assert set(m.grads) == set(m.params) and all(isinstance(g, StrictArray) for g in m.grads.values())


@pytest.mark.parametrize("kwargs,message", [
    (dict(pos_embed="rope_axial", dim=24, heads=4), r"head size \(dim / heads\) divisible by 4, got 24 / 4 = 6; "
                                                    r"valid head counts for dim 24: \[1, 2, 3, 6\]"),
    (dict(pos_embed="rope_mixed", rope_theta=0.0), "rope_theta must be a finite float > 0, got 0.0"),
    (dict(pos_embed="rope_mixed", rope_theta=float("inf")), "rope_theta must be a finite float > 0"),
    (dict(pos_embed="rope_axial", rope_theta="100"), "rope_theta must be a finite float > 0"),
    (dict(pos_embed="learned", rope_theta=100.0), "rope_theta is for pos_embed='rope_axial' or 'rope_mixed'"),
    (dict(pos_embed="rope"), "pos_embed must be one of .*'rope_axial', 'rope_mixed'"),
    (dict(pos_embed="learned", rope_ref_grid=(2, 2)), "rope_ref_grid is for pos_embed='rope_axial' or 'rope_mixed'"),
    (dict(pos_embed="rope_mixed", rope_ref_grid=(2, 0)), r"rope_ref_grid\[1\] must be an int >= 1, got 0"),
    (dict(pos_embed="rope_mixed", rope_ref_grid="2x2"), r"rope_ref_grid must be a patch grid \(rows, columns\)"),
])
def test_bad_rope_configs(kwargs, message):
    base = dict(image_size=8, patch_size=4, num_classes=2, dim=16, depth=1, heads=2, mlp_dim=8)
    with pytest.raises(ValueError, match=message):
        VisionTransformer(**{**base, **kwargs})


def test_bad_rope_layer_inputs():
    x = np.zeros((B, NH, 1 + NP, HS))
    good = np.zeros((1, NP, HS // 2))
    cases = [
        (x[0], good, 1, r"rope input must be \(B, NH, N, hs\), got 3-D"),
        (x, good[0], 1, r"rope angles must be \(heads or 1, Np, hs/2\)"),
        (x, np.zeros((1, NP, 3)), 1, "rope angles have 3 pairs per head but the head size is 8 .expected 4 pairs."),
        (x, np.zeros((3, NP, 4)), 1, "rope angles are for 3 heads but the input has 2"),
        (x, good, 2, r"rope angles are for 6 patches but the input has 7 tokens with 2 prefix tokens \(5 patches\)"),
        (x, good, -1, "num_prefix must be an int >= 0, got -1"),
    ]
    for xx, aa, t, message in cases:
        with pytest.raises(ValueError, match=message):
            rope_forward(xx, aa, t)
    with pytest.raises(ValueError, match=r"rope freqs must be \(2, heads, hs/2\)"):
        rope_angles_forward(np.zeros((3, 1, 4)), rope_positions(GH, GW))
    with pytest.raises(ValueError, match=r"head size \(dim / heads\) divisible by 4, got 6"):
        rope_axial_freqs(6)
    with pytest.raises(ValueError, match="rope theta must be a finite float > 0"):
        rope_mixed_freqs(8, 2, 1, theta=-1.0)


def test_a_rope_model_reads_a_larger_image_with_the_same_weights(tmp_path):
    """No table to resample: the state dict of a 8x8 model loads into a 16x16 one unchanged, and the
    config (pos_embed, rope_theta) survives a training checkpoint."""
    from tinyvit.training.checkpoint import load_checkpoint, restore, save_checkpoint
    from tinyvit.training.optim import AdamW, decays

    kw = dict(patch_size=4, num_classes=3, dim=16, depth=2, heads=2, mlp_dim=16, pos_embed="rope_mixed",
              rope_theta=5.0)
    small = VisionTransformer(image_size=8, **kw)
    big = VisionTransformer(image_size=16, **kw)
    big.load_state_dict(small.state_dict())
    assert big.forward(np.zeros((1, 3, 16, 16), "float32")).shape == (1, 3)
    assert not decays("rope.freqs", small.params["rope.freqs"].shape), "the frequencies are not weight-decayed"
    with pytest.raises(ValueError, match="image is 16x16 but the model expects 8x8.*RoPE"):
        small.forward(np.zeros((1, 3, 16, 16), "float32"))

    opt = AdamW(lr=1e-3)
    loss, d = softmax_cross_entropy(small.forward(np.ones((2, 3, 8, 8), "float32")), np.array([0, 1]))
    small.backward(d)
    opt.step(small.params, small.grads)
    save_checkpoint(tmp_path / "ck.safetensors", small, opt, 1)
    ck = load_checkpoint(tmp_path / "ck.safetensors")
    assert ck.meta["model_config"]["pos_embed"] == "rope_mixed" and ck.meta["model_config"]["rope_theta"] == 5.0
    again = VisionTransformer.from_config(ck.meta["model_config"])
    assert again.config == small.config
    restore(ck, again, AdamW(lr=1e-3))
    np.testing.assert_array_equal(again.params["rope.freqs"], small.params["rope.freqs"])
    interp = VisionTransformer(image_size=16, rope_ref_grid=2, **kw)  # a 4x4 grid read on the trained 2x2 range
    assert interp.config.rope_ref_grid == (2, 2) and float(interp._rope_pos.max()) == 1.5
    assert VisionTransformer.from_config(interp.config.to_dict()).config == interp.config
    other = VisionTransformer(image_size=8, **{**kw, "rope_theta": None})
    assert other.config.rope_theta == 10.0
    with pytest.raises(ValueError, match="checkpoint was written by a model with config"):
        restore(ck, other, AdamW(lr=1e-3))


@pytest.mark.parametrize("kind", ["axial", "mixed"])
def test_matches_timms_rotary_code(kind):
    """timm's RotaryEmbeddingCat (axial, as its RoPE-ViT models build it: index grid, 'xy', temperature 100)
    and RotaryEmbeddingMixed with our frequencies loaded, applied by timm's apply_rot_embed_cat: the same
    turned q. Runs where timm imports (it needs torchvision; not in the test extra)."""
    sincos = pytest.importorskip("timm.layers.pos_embed_sincos")
    rng = np.random.default_rng(6)
    hs, heads, depth = 16, 2, 2
    x = rng.standard_normal((B, heads, NP, hs))
    if kind == "axial":
        rope = sincos.RotaryEmbeddingCat(hs, temperature=100.0, in_pixels=False, grid_indexing="xy")
        emb = rope.get_embed([GH, GW]).to(torch.float64)  # (Np, 2 hs): sin | cos
        angles, _ = rope_angles_forward(rope_axial_freqs(hs, 100.0), rope_positions(GH, GW))
    else:
        rope = sincos.RotaryEmbeddingMixed(heads * hs, depth, heads, temperature=10.0, grid_indexing="xy")
        freqs = rope_mixed_freqs(hs, heads, depth, 10.0, rng)
        with torch.no_grad():
            rope.freqs.copy_(torch.tensor(freqs))
        emb = rope.get_embed([GH, GW]).to(torch.float64)[1]  # block 1: (NH, Np, 2 hs)
        angles, _ = rope_angles_forward(freqs[:, 1], rope_positions(GH, GW))
    ours, _ = rope_forward(x, angles, 0)
    theirs = sincos.apply_rot_embed_cat(torch.tensor(x), emb.detach()).numpy()
    assert_close("rotated q", ours, theirs, rtol=1e-5, atol=1e-6)  # timm builds its tables in float32


@pytest.mark.parametrize("kind", ["rope_axial", "rope_mixed"])
def test_rope_under_flash_attention_equals_plain(kind):
    """attn_impl='flash' turns q and k the same way: logits and every gradient equal plain's (float64, 1e-12)."""
    kw = dict(image_size=(8, 12), patch_size=4, num_classes=3, dim=16, depth=2, heads=2, mlp_dim=16, pos_embed=kind,
              dtype="float64", seed=4)
    x = np.random.default_rng(8).standard_normal((2, 3, 8, 12))
    out = []
    for impl in ("plain", "flash"):
        m = VisionTransformer(attn_impl=impl, attn_block=3, **kw)
        loss, d = softmax_cross_entropy(m.forward(x), np.array([0, 2]))
        out.append((m.backward(d), m.grads))
    assert_close("dx", out[1][0], out[0][0], rtol=1e-12, atol=1e-12)
    for k in out[0][1]:
        assert_close(k, out[1][1][k], out[0][1][k], rtol=1e-12, atol=1e-12)


def test_tinyvit_train_with_rope(tmp_path, capsys):
    """``tinyvit train --pos-embed rope_mixed --rope-theta 5``: the checkpoint keeps both (model and training
    config); a bad theta is refused before any step."""
    from tinyvit.cli import main
    from tinyvit.training.checkpoint import load_checkpoint

    out = tmp_path / "rope"
    rc = main(["train", "--epochs", "1", "--dim", "16", "--depth", "1", "--heads", "2", "--mlp-dim", "32",
               "--batch-size", "256", "--warmup-epochs", "0.5", "--pos-embed", "rope_mixed", "--rope-theta", "5",
               "--out", str(out), "--no-progress"])
    assert rc == 0 and "test accuracy:" in capsys.readouterr().out
    meta = load_checkpoint(out / "checkpoint.safetensors").meta
    assert meta["model_config"]["pos_embed"] == "rope_mixed" and meta["model_config"]["rope_theta"] == 5.0
    assert meta["train_config"]["rope_theta"] == 5.0
    rc = main(["train", "--epochs", "1", "--warmup-epochs", "0", "--pos-embed", "rope_axial", "--rope-theta", "-3",
               "--out", str(tmp_path / "bad"), "--no-progress"])
    assert rc == 1 and "rope_theta must be a finite float > 0, got -3.0" in capsys.readouterr().err


def test_per_image_angles_match_finite_differences():
    """Patch dropout keeps other patches in each image: positions (B, 2, K) -> angles (B, NHf, K, hs/2)."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((B, NH, 1 + 4, HS))
    for heads in (1, NH):
        check(lambda x_, a_: rope_forward(x_, a_, 1), rope_backward,
              [x, rng.standard_normal((B, heads, 4, HS // 2))], ["x", "angles (B, NHf, K, hs/2)"])
    pos = rng.random((B, 2, 4)) * 3
    check(lambda f: rope_angles_forward(f, pos), lambda d, c: (rope_angles_backward(d, c),),
          [rng.standard_normal((2, NH, HS // 2))], ["freqs (per-image positions)"])
    with pytest.raises(ValueError, match="rope angles are for 3 images but the input has 2"):
        rope_forward(x, np.zeros((3, 1, 4, HS // 2)), 1)


@pytest.mark.parametrize("kind", ["rope_axial", "rope_mixed"])
def test_patch_dropout_keeps_each_patch_at_its_place(kind):
    """Patch dropout that keeps every patch but shuffles them (rate 0, injected noise): with RoPE the positions
    travel with the tokens, so logits and every gradient equal the unshuffled model's (float64, 1e-12)."""
    kw = dict(image_size=(8, 12), patch_size=4, num_classes=3, dim=16, depth=2, heads=2, mlp_dim=16, pos_embed=kind,
              dtype="float64", seed=5, pool="cls")
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 3, 8, 12))
    dlogits = rng.standard_normal((2, 3))
    plain, dropped = VisionTransformer(**kw), VisionTransformer(patch_drop_rate=0.0, **kw)
    ref = plain.forward(x, train=True)
    dx_ref = plain.backward(dlogits)
    out = dropped.forward(x, train=True, masks={"patch_drop": rng.random((2, 6))})
    dx = dropped.backward(dlogits)
    assert_close("logits", out, ref, rtol=1e-12, atol=1e-12)
    assert_close("dx", dx, dx_ref, rtol=1e-12, atol=1e-12)
    for k in plain.grads:
        assert_close(k, dropped.grads[k], plain.grads[k], rtol=1e-12, atol=1e-12)


def test_rope_mixed_with_patch_dropout_matches_finite_differences():
    """Half the patches dropped, a different half per image: dL/dx and dL/d rope.freqs by central differences."""
    from tests.test_tome import numeric_grad

    m = VisionTransformer(image_size=8, patch_size=2, num_classes=3, dim=16, depth=1, heads=2, mlp_dim=16,
                          pos_embed="rope_mixed", patch_drop_rate=0.5, dtype="float64", seed=1, pool="mean")
    x = np.random.default_rng(11).standard_normal((2, 3, 8, 8))
    noise = np.random.default_rng(12).random((2, 16))
    dlogits = np.random.default_rng(13).standard_normal((2, 3))
    m.forward(x, train=True, masks={"patch_drop": noise})
    dx = m.backward(dlogits)
    f = lambda: m.forward(x, train=True, masks={"patch_drop": noise})  # noqa: E731
    assert_close("dx", dx, numeric_grad(f, x, dlogits), **FD_TOLERANCE)
    assert_close("rope.freqs", m.grads["rope.freqs"], numeric_grad(f, m.params["rope.freqs"], dlogits),
                 **FD_TOLERANCE)
