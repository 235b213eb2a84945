"""The memory options the benchmarks use: forward/backward with keep_cache=False give the
same numbers as the default and hold less memory (tracemalloc, deterministic for NumPy)."""
import numpy as np
import pytest

from tinyvit import VisionTransformer, softmax_cross_entropy
from tinyvit.benchmark import timing

CFG = dict(image_size=16, patch_size=4, num_classes=5, dim=32, depth=3, heads=2, mlp_dim=64)


def _batch():
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, 3, 16, 16)).astype(np.float32), np.arange(4) % 5


def test_backward_without_cache_gives_the_same_gradients_and_releases_it():
    x, y = _batch()
    m = VisionTransformer(**CFG)
    _, dlogits = softmax_cross_entropy(m.forward(x, train=True), y)
    dx_keep = m.backward(dlogits)
    grads_keep = dict(m.grads)
    m.forward(x, train=True)
    dx_free = m.backward(dlogits, keep_cache=False)
    np.testing.assert_array_equal(dx_free, dx_keep)
    for k, v in grads_keep.items():
        np.testing.assert_array_equal(m.grads[k], v, err_msg=k)
    with pytest.raises(RuntimeError, match="keep_cache=False"):
        m.backward(dlogits)
    with pytest.raises(RuntimeError):
        m.attention_maps()


def test_forward_without_cache_gives_the_same_logits():
    x, _ = _batch()
    m = VisionTransformer(**CFG)
    keep = m.forward(x)
    maps = m.attention_maps()
    free = m.forward(x, keep_cache=False)
    np.testing.assert_array_equal(free, keep)
    assert len(maps) == CFG["depth"]
    with pytest.raises(RuntimeError, match="before forward"):
        m.backward(np.zeros_like(free))


def test_keep_cache_false_holds_less_memory():
    x, y = _batch()
    m = VisionTransformer(**CFG)

    def step(keep):
        _, dlogits = softmax_cross_entropy(m.forward(x, train=True), y)
        m.backward(dlogits, keep_cache=keep)

    step(True)
    m.grads = {}
    keep = timing.numpy_peak_bytes(lambda: step(True))
    m.grads = {}
    free = timing.numpy_peak_bytes(lambda: step(False))
    assert free < keep
    infer_keep = timing.numpy_peak_bytes(lambda: m.forward(x))
    infer_free = timing.numpy_peak_bytes(lambda: m.forward(x, keep_cache=False))
    assert infer_free < infer_keep
