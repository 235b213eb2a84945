"""Windowed attention (tinyvit/layers/window_attention.py: Swin's W-MSA / SW-MSA with the prefix
tokens as Vision Longformer's global tokens) against a PyTorch twin written as Swin's code
(tests/torch_twin.py: roll, window_partition, relative position bias, -100 mask, window_reverse),
finite differences and the strict (CuPy-like) arrays.

Tolerances: float64 against PyTorch 1e-10 absolute (scaled by the tensor's magnitude: the
tolerance table of tests/tolerances.py), finite differences FD_TOLERANCE.
"""
import numpy as np
import pytest
import torch

from tinyvit import VisionTransformer, softmax_cross_entropy
from tinyvit.backend import Backend
from tinyvit.benchmark import flops
from tinyvit.gradcheck import assert_backward
from tinyvit.layers.attention import attention_backward, attention_forward
from tinyvit.layers.window_attention import (WindowSpec, relative_bias_backward, relative_bias_forward,
                                             relative_position_index, shift_mask, valid_window_sizes,
                                             window_attention_backward, window_attention_forward,
                                             window_core_backward, window_core_forward, window_token_index)
from tests.strict_array import StrictArray, strict_xp
from tests.test_model_twin import compare_with_twin, perturbed_model
from tests.tolerances import TOLERANCES, assert_close
from tests.torch_twin import swin_relative_position_index, swin_shift_mask, torch_window_attention

SPECS = [  # (grid, prefix T, M, shift)
    ((4, 4), 1, 2, 0), ((4, 4), 1, 2, 1), ((6, 4), 2, 2, 1), ((6, 6), 1, 3, 1), ((4, 4), 0, 2, 1), ((6, 6), 1, 6, 0),
]


def _layer_inputs(rng, spec, B=2, NH=2, hs=3, dtype="float64"):
    D = NH * hs
    N = spec.prefix + spec.grid[0] * spec.grid[1]
    x = rng.standard_normal((B, N, D))
    w = [rng.standard_normal((3 * D, D)) * 0.5, rng.standard_normal(3 * D), rng.standard_normal((D, D)),
         rng.standard_normal(D)]
    table = rng.standard_normal(((2 * spec.size - 1) ** 2, NH))
    return [a.astype(dtype) for a in [x, *w, table]]


def _window_masks(rng, spec, B, NH, p):
    n_win = (spec.grid[0] // spec.size) * (spec.grid[1] // spec.size)
    S, T = spec.size ** 2, spec.prefix
    N = T + spec.grid[0] * spec.grid[1]
    return rng.random((B, NH, n_win, S, T + S)) > p, rng.random((B, NH, T, N)) > p


@pytest.mark.parametrize("grid,T,M,shift", SPECS)
@pytest.mark.parametrize("dropout", [False, True], ids=["eval", "attn-dropout"])
def test_window_attention_matches_swin_twin(grid, T, M, shift, dropout):
    rng = np.random.default_rng(hash((grid, T, M, shift)) % 2 ** 32)
    spec = WindowSpec(grid, T, M, shift)
    NH, p = 2, 0.3
    x, qw, qb, pw, pb, table = _layer_inputs(rng, spec, NH=NH)
    masks = _window_masks(rng, spec, x.shape[0], NH, p) if dropout else None
    out, cache = window_attention_forward(x, qw, qb, pw, pb, table, NH, spec, p if dropout else 0.0, dropout,
                                          attn_mask=masks)
    dout = rng.standard_normal(out.shape)
    grads = window_attention_backward(dout, cache)
    t = [torch.tensor(a, requires_grad=True) for a in (x, qw, qb, pw, pb, table)]
    tmasks = None if masks is None else tuple(torch.tensor(m) for m in masks)
    out_t = torch_window_attention(*t, NH, spec, tmasks, p)
    (out_t * torch.tensor(dout)).sum().backward()
    assert_close("out", out, out_t.detach().numpy(), **TOLERANCES["float64"])
    for name, g, ref in zip(("dx", "dqkv_w", "dqkv_b", "dproj_w", "dproj_b", "dtable"), grads, t):
        assert_close(name, g, ref.grad.numpy(), **TOLERANCES["float64"])


def test_window_core_backward_against_finite_differences():
    """dq, dk, dv and the bias table's gradient (the scatter-add), shifted windows, with and without
    injected dropout masks, against central differences (tinyvit.gradcheck, float64)."""
    rng = np.random.default_rng(5)
    spec = WindowSpec((4, 4), 1, 2, 1)
    B, NH, N, hs = 1, 2, 17, 2
    q, k, v = (rng.standard_normal((B, NH, N, hs)) for _ in range(3))
    table = rng.standard_normal((9, NH))
    masks = _window_masks(rng, spec, B, NH, 0.25)
    for attn_mask in (None, masks):
        train = attn_mask is not None
        assert_backward(lambda q, k, v, table: window_core_forward(q, k, v, table, 0.6, spec, 0.25, train,
                                                                   attn_mask=attn_mask),
                        window_core_backward, [q, k, v, table], names=["q", "k", "v", "table"])


def test_relative_bias_is_swins_gather_and_its_backward_a_scatter_add():
    for M in (1, 2, 3, 7):
        np.testing.assert_array_equal(relative_position_index(M), swin_relative_position_index(M).numpy())
    rng = np.random.default_rng(0)
    M, NH = 3, 4
    table = rng.standard_normal(((2 * M - 1) ** 2, NH))
    bias, cache = relative_bias_forward(table, M)
    index = relative_position_index(M)
    for h in range(NH):
        np.testing.assert_array_equal(bias[h], table[index, h])
    dbias = rng.standard_normal(bias.shape)
    want = np.zeros_like(table)
    np.add.at(want, index.reshape(-1), dbias.reshape(NH, -1).T)  # the scatter-add, NumPy's own way
    np.testing.assert_allclose(relative_bias_backward(dbias, cache), want, rtol=1e-14, atol=1e-14)
    assert relative_bias_backward(dbias.astype("float32"), cache).dtype == np.float32


def test_shift_mask_and_window_order_are_swins():
    for grid, M, s in (((4, 4), 2, 1), ((8, 8), 4, 2), ((6, 9), 3, 1)):
        np.testing.assert_array_equal(shift_mask(grid, M, s), swin_shift_mask(*grid, M, s).numpy())
    # no shift: window 0 holds the top-left M x M patches, in row-major order, after the T prefix tokens
    idx = window_token_index(WindowSpec((4, 6), 2, 2, 0))
    np.testing.assert_array_equal(idx[0], [2, 3, 8, 9])
    np.testing.assert_array_equal(idx[1], [4, 5, 10, 11])
    assert sorted(idx.ravel().tolist()) == list(range(2, 26))


def test_one_window_over_the_grid_with_zero_bias_is_global_attention():
    """M = the grid, no shift, a zero bias table: every token sees every token, as plain attention."""
    rng = np.random.default_rng(1)
    spec = WindowSpec((3, 3), 1, 3, 0)
    x, qw, qb, pw, pb, table = _layer_inputs(rng, spec)
    table[:] = 0.0
    out, cache = window_attention_forward(x, qw, qb, pw, pb, table, 2, spec)
    plain, plain_cache = attention_forward(x, qw, qb, pw, pb, 2)
    dout = rng.standard_normal(out.shape)
    np.testing.assert_allclose(out, plain, rtol=0, atol=1e-12)
    for a, b in zip(window_attention_backward(dout, cache)[:5], attention_backward(dout, plain_cache)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", [
    dict(attn_window=2),
    dict(attn_window=2, attn_shift=True),
    dict(attn_window=2, attn_shift=True, pool="mean", norm_first=False),
    dict(attn_window=2, attn_shift=True, distilled=True, qkv_bias=False, depth=3),
], ids=["W-MSA", "SW-MSA", "shift-mean-postnorm", "shift-distilled-depth3"])
def test_whole_windowed_model_matches_pytorch(variant):
    kw = dict(image_size=(16, 8), patch_size=2, num_classes=4, dim=8, depth=2, heads=2, mlp_dim=12)
    m = perturbed_model(**{**kw, **variant})
    assert m.params["blocks.0.attn.relative_position_bias_table"].shape == (9, 2)
    compare_with_twin(m, np.random.default_rng(1).standard_normal((2, 3, 16, 8)))


def test_whole_windowed_model_in_training_mode_matches_pytorch():
    from tinyvit.layers.block import BlockMasks

    m = perturbed_model(image_size=8, patch_size=2, num_classes=3, dim=8, depth=2, heads=2, mlp_dim=12,
                        dropout=0.2, attn_dropout=0.3, emb_dropout=0.1, drop_path_rate=0.5, attn_window=2,
                        attn_shift=True)
    rng = np.random.default_rng(3)
    B, N, D, F, NH = 2, m.config.num_tokens, 8, 12, 2
    masks = {"emb": rng.random((B, N, D)) > 0.1}
    for i in range(2):
        masks[f"blocks.{i}"] = BlockMasks(_window_masks(rng, m.config.window_spec(i), B, NH, 0.3),
                                          rng.random((B, N, D)) > 0.2, rng.random((B, N, F)) > 0.2,
                                          rng.random((B, N, D)) > 0.2, np.array([1, 0], bool).reshape(B, 1, 1),
                                          np.array([1, 1], bool).reshape(B, 1, 1))
    compare_with_twin(m, rng.standard_normal((B, 3, 8, 8)), masks=masks, train=True)


def test_shift_alternates_and_attention_maps_stay_in_the_windows():
    m = VisionTransformer(image_size=16, patch_size=4, num_classes=3, dim=8, depth=3, heads=2, mlp_dim=8,
                          attn_window=2, attn_shift=True, dtype="float64")
    assert [m.config.window_spec(i).shift for i in range(3)] == [0, 1, 0]
    m.forward(np.random.default_rng(0).standard_normal((2, 3, 16, 16)))
    maps = m.attention_maps()
    assert len(maps) == 3 and maps[0].shape == (2, 2, 17, 17)
    for a in maps:
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-12)
    # block 0, no shift: patch (0, 0) (token 1) sees the class token and its 2 x 2 window only
    seen = np.flatnonzero(maps[0][0, 0, 1] > 0)
    np.testing.assert_array_equal(seen, [0, 1, 2, 5, 6])
    assert np.all(maps[0][:, :, 0] > 0)  # the class token sees everything


def test_windowed_model_on_strict_arrays():
    from tests.conftest import model_on

    strict = Backend("strict", strict_xp)
    kw = dict(image_size=8, patch_size=2, num_classes=5, dim=8, depth=2, heads=2, mlp_dim=12, dropout=0.1,
              attn_dropout=0.2, drop_path_rate=0.2, attn_window=2, attn_shift=True, dtype="float32", seed=2)
    m = model_on(strict, **kw)
    ref = VisionTransformer(**kw)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype("float32")
    labels = np.array([0, 1])
    logits = m.forward(strict.asarray(x), train=True)
    _, d = softmax_cross_entropy(logits, labels)
    dx = m.backward(d)
    assert isinstance(dx, StrictArray) and all(isinstance(g, StrictArray) for g in m.grads.values())
    assert all(isinstance(a, StrictArray) for a in m.attention_maps())
    ref_logits = ref.forward(x, train=True)
    _, ref_d = softmax_cross_entropy(ref_logits, labels)
    ref_dx = ref.backward(ref_d)
    assert_close("logits", strict_xp.to_host(logits), ref_logits, **TOLERANCES["float32"])
    assert_close("dx", strict_xp.to_host(dx), ref_dx, **TOLERANCES["float32"])
    key = "blocks.1.attn.relative_position_bias_table"
    assert_close(key, strict_xp.to_host(m.grads[key]), ref.grads[key], **TOLERANCES["float32"])


def test_flops_fall_with_the_window():
    base = dict(flops.PRESETS["vit_ti16"], image_size=448)  # 28 x 28 grid
    glob = flops.macs_by_layer(base)["attn_scores"]
    per_m = [flops.macs_by_layer(dict(base, attn_window=m))["attn_scores"] for m in (14, 7, 4, 2)]
    assert glob > per_m[0] > per_m[1] > per_m[2] > per_m[3]
    N, T, Np, D, depth = 785, 1, 784, 192, 12
    assert per_m[1] == depth * D * (Np * (T + 49) + T * N)  # windows: S + T keys per patch; the class token: N


KW = dict(image_size=(24, 16), patch_size=4, num_classes=2, dim=8, depth=2, heads=2, mlp_dim=8)  # a 6 x 4 grid


@pytest.mark.parametrize("over, match", [
    (dict(attn_window=3), r"attn_window=3 does not divide the 6x4 patch grid; valid window sizes: \[1, 2\]"),
    (dict(attn_window=5), r"valid window sizes: \[1, 2\]"),
    (dict(attn_window=-1), r"attn_window must be an int >= 1 \(0: global attention\), got -1"),
    (dict(attn_window=2.0), r"attn_window must be an int"),
    (dict(attn_shift=True), r"attn_shift=True needs windows"),
    (dict(attn_window=1, attn_shift=True), r"attn_window >= 2"),
    (dict(attn_window=2, attn_impl="flash"), r"attn_window and attn_impl='flash' do not combine"),
])
def test_bad_window_settings_are_clear_errors(over, match):
    with pytest.raises(ValueError, match=match):
        VisionTransformer(**{**KW, **over})


def test_shift_with_one_window_over_the_grid_is_refused():
    with pytest.raises(ValueError, match=r"smaller than both sides of the 4x4 grid, got attn_window=4"):
        VisionTransformer(image_size=16, patch_size=4, num_classes=2, dim=8, depth=2, heads=2, mlp_dim=8,
                          attn_window=4, attn_shift=True)
    with pytest.raises(ValueError, match=r"smaller than both sides of the 2x6 grid.*use one of \[\] or"):
        VisionTransformer(image_size=(8, 24), patch_size=4, num_classes=2, dim=8, depth=2, heads=2, mlp_dim=8,
                          attn_window=2, attn_shift=True)
    assert valid_window_sizes((14, 14)) == [1, 2, 7, 14]


def test_layer_refuses_a_wrong_table_or_token_count():
    rng = np.random.default_rng(0)
    spec = WindowSpec((4, 4), 1, 2, 0)
    x, qw, qb, pw, pb, table = _layer_inputs(rng, spec)
    with pytest.raises(ValueError, match=r"relative_position_bias_table must be \(\(2M-1\)\^2, NH\) = \(9, 2\)"):
        window_attention_forward(x, qw, qb, pw, pb, table[:4], 2, spec)
    with pytest.raises(ValueError, match="needs 17 tokens, got 16"):
        window_attention_forward(x[:, 1:], qw, qb, pw, pb, table, 2, spec)


@pytest.mark.parametrize("shift", [0, 1], ids=["W-MSA", "SW-MSA"])
def test_window_core_matches_timm_window_attention(shift):
    """Where timm imports beside PyTorch (not with the pinned torch 2.13; see the README's side
    environment): timm's own ``WindowAttention`` (qkv, relative position bias, the mask, proj) on
    the windows of a 4 x 4 grid without prefix tokens equals tinyvit's window attention."""
    swin = pytest.importorskip("timm.models.swin_transformer")
    rng = np.random.default_rng(7)
    spec = WindowSpec((4, 4), 0, 2, shift)
    NH, hs, B = 2, 3, 2
    x, qw, qb, pw, pb, table = _layer_inputs(rng, spec, B=B, NH=NH, hs=hs)
    out, _ = window_attention_forward(x, qw, qb, pw, pb, table, NH, spec)
    layer = swin.WindowAttention(NH * hs, NH, window_size=2).double()
    with torch.no_grad():
        for name, value in (("qkv.weight", qw), ("qkv.bias", qb), ("proj.weight", pw), ("proj.bias", pb),
                            ("relative_position_bias_table", table)):
            dict(layer.named_parameters())[name].copy_(torch.tensor(value))
        xt = torch.tensor(x).reshape(B, 4, 4, NH * hs)
        if shift:
            xt = torch.roll(xt, shifts=(-shift, -shift), dims=(1, 2))
        windows = swin.window_partition(xt, (2, 2)).reshape(-1, 4, NH * hs)
        mask = torch.tensor(shift_mask((4, 4), 2, shift)) if shift else None
        y = swin.window_reverse(layer(windows, mask=mask).reshape(-1, 2, 2, NH * hs), (2, 2), 4, 4)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
    assert_close("timm WindowAttention", out, y.reshape(B, 16, NH * hs).numpy(), **TOLERANCES["float64"])


@pytest.mark.parametrize("pos_embed", ["rope_axial", "rope_mixed"])
def test_windowed_model_with_2d_rope_matches_pytorch(pos_embed):
    """2D RoPE turns q and k before the windows are cut (the class token unturned): the whole
    model, shifted windows, against the twin (which turns them the RoPE-ViT paper's complex way)."""
    m = perturbed_model(image_size=8, patch_size=2, num_classes=3, dim=16, depth=2, heads=2, mlp_dim=12,
                        attn_window=2, attn_shift=True, pos_embed=pos_embed)
    compare_with_twin(m, np.random.default_rng(2).standard_normal((2, 3, 8, 8)))
    if pos_embed == "rope_mixed":
        assert "rope.freqs" in m.grads
