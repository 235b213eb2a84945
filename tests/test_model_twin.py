"""The whole model against its PyTorch twin (tests/torch_twin.py) with identical weights:
logits, the input gradient and every parameter gradient, float64.

Tolerance: 1e-10 absolute on O(1) quantities, float64 (the two sides differ only in
summation order).
"""
import numpy as np
import pytest
import torch

from tinyvit import VisionTransformer
from tinyvit.block import BlockMasks
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
    fixed = None if m.config.pos_embed == "learned" else torch.tensor(np.asarray(m._fixed_pos))
    tmasks = None
    if masks:
        tmasks = {k: (torch.tensor(v) if not isinstance(v, BlockMasks)
                      else BlockMasks(*[None if a is None else torch.tensor(a) for a in v])) for k, v in masks.items()}
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
