"""The same model on every backend, and the proof that no step relies on a host round-trip.

The strict backend's arrays (tests/strict_array.py) refuse ``numpy.asarray``, ``float()``,
``bool()`` and every NumPy function, as CuPy's refuse implicit conversion: a model forward
and backward that completes on them never leaves the device inside a step.
"""
import numpy as np
import pytest

from tinyvit import VisionTransformer, softmax_cross_entropy, to_host
from tinyvit.backend import Backend, get_backend
from tinyvit.layers.block import BlockMasks
from tests.conftest import model_on
from tests.strict_array import HostTransferError, StrictArray, strict_xp
from tests.tolerances import TOLERANCES, assert_close

CONFIGS = [
    dict(image_size=8, patch_size=4, num_classes=5, dim=16, depth=2, heads=4, mlp_dim=24),
    dict(image_size=(8, 12), patch_size=4, num_classes=3, dim=16, depth=2, heads=2, mlp_dim=20, channels=1,
         norm_first=False, pool="mean", gelu="tanh", pos_embed="sincos2d"),
    dict(image_size=8, patch_size=2, num_classes=4, dim=12, depth=1, heads=3, mlp_dim=16, distilled=True,
         pos_embed="sincos1d", qkv_bias=False),
    dict(image_size=(8, 12), patch_size=4, num_classes=3, dim=16, depth=2, heads=2, mlp_dim=20, distilled=True,
         pos_embed="rope_mixed"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["prenorm-cls", "postnorm-mean-tanh-2d", "distilled-1d",
                                                 "distilled-rope-mixed"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_every_backend_matches_numpy(any_backend, config, dtype):
    """Forward, loss and backward in training mode (dropout, attention dropout, drop path on)
    give the same numbers on every backend as on NumPy, with the same seed."""
    cfg = dict(config, dropout=0.1, attn_dropout=0.1, emb_dropout=0.1, drop_path_rate=0.2)
    reference = VisionTransformer(backend="numpy", dtype=dtype, seed=3, **cfg)
    m = model_on(any_backend, dtype=dtype, seed=3, **cfg)
    rng = np.random.default_rng(0)
    C, (H, W) = reference.config.channels, reference.config.image_size
    x_host = rng.standard_normal((3, C, H, W)).astype(dtype)
    labels = np.array([0, 1, 2])
    masks = _host_masks(reference, 3, rng)
    outs = []
    for model in (reference, m):
        b = model.backend
        x = b.asarray(x_host)
        dev_masks = {k: (BlockMasks(*[None if a is None else b.asarray(a) for a in v]) if isinstance(v, BlockMasks)
                         else b.asarray(v)) for k, v in masks.items()}
        logits = model.forward(x, train=True, masks=dev_masks)
        loss, dlogits = softmax_cross_entropy(logits, labels)
        dx = model.backward(dlogits)
        outs.append((logits, loss, dx, model.grads))
    tol = TOLERANCES[dtype]
    (l0, s0, d0, g0), (l1, s1, d1, g1) = outs
    assert type(l1) is type(m.backend.asarray(np.zeros(1)))
    assert_close("logits", to_host(l1), l0, **tol)
    assert_close("loss", to_host(s1), s0, **tol)
    assert_close("dx", to_host(d1), d0, **tol)
    assert set(g1) == set(g0) == set(m.params)
    for k in g0:
        assert g1[k].dtype == np.dtype(dtype), k
        assert_close(k, to_host(g1[k]), g0[k], **tol)


def _host_masks(model, batch, rng):
    c = model.config
    N, D, F, NH = c.num_tokens, c.dim, c.mlp_dim, c.heads
    masks = {"emb": rng.random((batch, N, D)) > 0.1}
    for i in range(c.depth):
        masks[f"blocks.{i}"] = BlockMasks(rng.random((batch, NH, N, N)) > 0.1, rng.random((batch, N, D)) > 0.1,
                                          rng.random((batch, N, F)) > 0.1, rng.random((batch, N, D)) > 0.1,
                                          rng.random((batch, 1, 1)) > 0.2, rng.random((batch, 1, 1)) > 0.2)
    return masks


def test_strict_backend_draws_its_own_dropout_masks():
    """Dropout masks drawn on the device (no injected masks): still no host round-trip."""
    strict = Backend("strict", strict_xp)
    m = model_on(strict, image_size=8, patch_size=4, num_classes=5, dim=16, depth=2, heads=4, mlp_dim=24,
                 dropout=0.2, attn_dropout=0.2, emb_dropout=0.2, drop_path_rate=0.3, dtype="float32")
    x = strict.asarray(np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype("float32"))
    logits = m.forward(x, train=True)
    loss, dlogits = softmax_cross_entropy(logits, np.array([0, 1, 2, 3]))
    dx = m.backward(dlogits)
    assert isinstance(logits, StrictArray) and isinstance(dx, StrictArray) and isinstance(loss, StrictArray)
    assert all(isinstance(g, StrictArray) for g in m.grads.values())
    assert all(isinstance(a, StrictArray) for a in m.attention_maps())


def test_strict_array_really_refuses_the_host():
    """The stand-in must fail where CuPy (or worse) would: otherwise the test above proves nothing."""
    a = strict_xp.asarray(np.ones((2, 3), dtype="float32"))
    for leak in (lambda: np.asarray(a), lambda: float(a[0, 0]), lambda: bool(a[0, 0] > 0), lambda: np.exp(a),
                 lambda: np.sum(a), lambda: a + np.ones(3, dtype="float32"), lambda: list(a),
                 lambda: np.float64(2.0) * a):
        with pytest.raises((HostTransferError, TypeError)):
            leak()


def test_tinyvit_backend_env_var(monkeypatch):
    monkeypatch.setenv("TINYVIT_BACKEND", "numpy")
    assert VisionTransformer(image_size=8, patch_size=4, num_classes=2, dim=8, depth=1, heads=2,
                             mlp_dim=8).backend.name == "numpy"
    monkeypatch.setenv("TINYVIT_BACKEND", "jax")
    with pytest.raises(ValueError, match="backend must be one of"):
        get_backend(None)


def test_cupy_request_says_why_it_cannot_run():
    from tinyvit.backend import cupy_available
    ok, why = cupy_available()
    if ok:
        pytest.skip("CuPy runs here")
    with pytest.raises(RuntimeError, match="not installed|no GPU"):
        VisionTransformer(image_size=8, patch_size=4, num_classes=2, dim=8, depth=1, heads=2, mlp_dim=8,
                          backend="cupy")
