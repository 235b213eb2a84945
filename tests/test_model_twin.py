"""The whole model against its PyTorch twin (tests/torch_twin.py) with identical weights:
logits, the input gradient and every parameter gradient, float64.

Tolerance: 1e-10 absolute on O(1) quantities, float64 (the two sides differ only in
summation order).
"""
import numpy as np
import pytest
import torch

from tinyvit import VisionTransformer
from tinyvit.layers.block import BlockMasks
from tests.torch_twin import torch_params, torch_vit_forward

ATOL = 1e-10


def perturbed_model(seed=1, **kw):
    m = VisionTransformer(dtype="float64", seed=seed, **kw)
    rng = np.random.default_rng(seed)
    # move LayerNorm weights, biases and tokens away from their trivial initial values
    m.load_state_dict({k: v + rng.standard_normal(v.shape) * 0.1 for k, v in m.state_dict().items()})
    return m


def compare_with_twin(m, x, masks=None, train=False):
    rng = np.random.default_rng(7)
    if m.config.distilled:
        cls, dist = m.forward_distill(x, train=train, masks=masks)
        dcls, ddist = rng.standard_normal(cls.shape), rng.standard_normal(dist.shape)
        dx = m.backward_distill(dcls, ddist)
    else:
        cls = m.forward(x, train=train, masks=masks)
        dcls = rng.standard_normal(cls.shape)
        dx = m.backward(dcls)
    p = torch_params(m.state_dict())
    xt = torch.tensor(x, requires_grad=True)
    fixed = None if m._fixed_pos is None else torch.tensor(np.asarray(m._fixed_pos))
    tmasks = None
    if masks:
        def to_torch(a):  # a keep-mask, or a tuple of them (windowed attention: window rows, prefix rows)
            return None if a is None else tuple(map(to_torch, a)) if isinstance(a, tuple) else torch.tensor(a)
        tmasks = {k: (torch.tensor(v) if not isinstance(v, BlockMasks) else BlockMasks(*map(to_torch, v)))
                  for k, v in masks.items()}
    cls_t, dist_t = torch_vit_forward(xt, p, m.config, tmasks, fixed)
    total = (cls_t * torch.tensor(dcls)).sum()
    if m.config.distilled:
        total = total + (dist_t * torch.tensor(ddist)).sum()
        np.testing.assert_allclose(dist, dist_t.detach().numpy(), rtol=0, atol=ATOL, err_msg="dist logits")
    total.backward()
    np.testing.assert_allclose(cls, cls_t.detach().numpy(), rtol=0, atol=ATOL, err_msg="logits")
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=0, atol=ATOL, err_msg="dL/dx")
    assert set(m.grads) == set(p)
    for key, tensor in p.items():
        np.testing.assert_allclose(m.grads[key], tensor.grad.numpy(), rtol=0, atol=ATOL, err_msg=key)


@pytest.mark.parametrize("norm_first", [True, False], ids=["prenorm", "postnorm"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("image_size,channels", [((8, 8), 3), ((8, 12), 1)], ids=["square-rgb", "wide-gray"])
def test_whole_model_matches_pytorch(norm_first, pool, image_size, channels):
    m = perturbed_model(image_size=image_size, patch_size=4, num_classes=5, dim=16, depth=2, heads=4, mlp_dim=24,
                        channels=channels, norm_first=norm_first, pool=pool)
    x = np.random.default_rng(0).standard_normal((3, channels, *image_size))
    compare_with_twin(m, x)


@pytest.mark.parametrize("variant", [
    dict(distilled=True),
    dict(gelu="tanh", qkv_bias=False),
    dict(pos_embed="sincos1d"),
    dict(pos_embed="sincos2d", pool="mean", norm_first=False),
    dict(layer_norm_eps=1e-5, depth=3),
    dict(pos_embed="rope_axial", heads=4, dim=32),
    dict(pos_embed="rope_mixed", heads=2),
    dict(pos_embed="rope_mixed", distilled=True, norm_first=False, rope_theta=3.0),
    dict(pos_embed="rope_mixed", pool="mean", qkv_bias=False),
    dict(pos_embed="rope_axial", rope_ref_grid=(3, 2), heads=4, dim=32),
    dict(pos_embed="rope_mixed", rope_ref_grid=(1, 2)),
], ids=["distilled", "tanh-noqkvbias", "sincos1d", "sincos2d-mean-postnorm", "eps1e-5-depth3", "rope-axial",
        "rope-mixed", "rope-mixed-distilled-postnorm-theta3", "rope-mixed-mean",
        "rope-axial-ref-grid", "rope-mixed-ref-grid"])
def test_model_variants_match_pytorch(variant):
    kw = dict(image_size=(8, 12), patch_size=4, num_classes=4, dim=16, depth=2, heads=2, mlp_dim=20, channels=3)
    m = perturbed_model(**{**kw, **variant})
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 12))
    compare_with_twin(m, x)


def injected_masks(m, rng):
    """Every dropout mask of a batch of 4, drawn on the host so tinyvit and the twin share them:
    embedding, attention, projection, MLP and output dropout, and drop path (fixed per image)."""
    c = m.config
    B, N, D, F, NH = 4, c.num_tokens, c.dim, c.mlp_dim, c.heads
    masks = {"emb": rng.random((B, N, D)) > 0.1}
    for i in range(c.depth):
        masks[f"blocks.{i}"] = BlockMasks(rng.random((B, NH, N, N)) > 0.3, rng.random((B, N, D)) > 0.2,
                                          rng.random((B, N, F)) > 0.2, rng.random((B, N, D)) > 0.2,
                                          np.array([1, 0, 1, 1], bool).reshape(B, 1, 1),
                                          np.array([0, 1, 1, 1], bool).reshape(B, 1, 1))
    return masks


@pytest.mark.parametrize("norm_first", [True, False], ids=["prenorm", "postnorm"])
def test_training_mode_with_injected_masks_matches_pytorch(norm_first):
    """Dropout, attention dropout, embedding dropout and drop path all on, with one shared draw."""
    m = perturbed_model(image_size=8, patch_size=4, num_classes=3, dim=8, depth=2, heads=2, mlp_dim=12,
                        dropout=0.2, attn_dropout=0.3, emb_dropout=0.1, drop_path_rate=0.5, norm_first=norm_first)
    rng = np.random.default_rng(3)
    masks = injected_masks(m, rng)
    x = rng.standard_normal((4, 3, 8, 8))
    compare_with_twin(m, x, masks=masks, train=True)


def test_postnorm_block_is_pytorchs_transformer_encoder_layer():
    """The tutorial's nn.TransformerEncoderLayer (norm_first=False, GELU) loads a tinyvit post-norm
    block's weights unchanged (in_proj_weight is timm's fused qkv) and computes the same block."""
    from tinyvit.layers.block import block_backward, block_forward

    D, NH, F, eps = 16, 4, 24, 1e-5
    layer = torch.nn.TransformerEncoderLayer(d_model=D, nhead=NH, dim_feedforward=F, dropout=0.0, activation="gelu",
                                             batch_first=True, norm_first=False, layer_norm_eps=eps, dtype=torch.float64)
    layer.eval()
    t = dict(layer.named_parameters())
    p = {"attn.qkv.weight": t["self_attn.in_proj_weight"], "attn.qkv.bias": t["self_attn.in_proj_bias"],
         "attn.proj.weight": t["self_attn.out_proj.weight"], "attn.proj.bias": t["self_attn.out_proj.bias"],
         "mlp.fc1.weight": t["linear1.weight"], "mlp.fc1.bias": t["linear1.bias"],
         "mlp.fc2.weight": t["linear2.weight"], "mlp.fc2.bias": t["linear2.bias"],
         "norm1.weight": t["norm1.weight"], "norm1.bias": t["norm1.bias"],
         "norm2.weight": t["norm2.weight"], "norm2.bias": t["norm2.bias"]}
    with torch.no_grad():
        for v in p.values():
            v.add_(torch.randn_like(v) * 0.1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, D))
    out, cache = block_forward(x, {k: v.detach().numpy().copy() for k, v in p.items()}, NH, eps, norm_first=False)
    dout = rng.standard_normal(out.shape)
    dx, grads = block_backward(dout, cache)
    xt = torch.tensor(x, requires_grad=True)
    layer.train(False)
    out_t = layer(xt)
    (out_t * torch.tensor(dout)).sum().backward()
    np.testing.assert_allclose(out, out_t.detach().numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=0, atol=ATOL)
    for k, v in p.items():
        np.testing.assert_allclose(grads[k], v.grad.numpy(), rtol=0, atol=ATOL, err_msg=k)
