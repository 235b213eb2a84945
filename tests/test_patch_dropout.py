"""PatchDropout (timm's ``patch_drop_rate``): the kept count and rule, the backward's scatter against
finite differences through the whole model, evaluation untouched, bad input."""
import numpy as np
import pytest

from tinyvit import VisionTransformer
from tinyvit.layers.dropout import patch_dropout_backward, patch_dropout_forward
from tests.test_tome import numeric_grad
from tests.tolerances import FD_TOLERANCE, assert_close


def small(**kw):
    args = dict(image_size=8, patch_size=2, num_classes=5, dim=16, depth=2, heads=4, mlp_dim=24, channels=1,
                dtype="float64", seed=0)
    args.update(kw)
    return VisionTransformer(**args)


@pytest.mark.parametrize("rate,patches,kept", [(0.5, 16, 8), (0.25, 16, 12), (0.9, 16, 1), (0.99, 3, 1)])
def test_kept_count_and_timms_rule(rate, patches, kept):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x, noise = rng.standard_normal((3, 2 + patches, 4)), rng.random((3, patches))
    out, cache = patch_dropout_forward(x, rate, True, num_prefix=2, noise=noise)
    assert out.shape == (3, 2 + kept, 4)  # timm: max(1, int(L * (1 - p)))
    keep = torch.argsort(torch.tensor(noise), dim=-1)[:, :kept].numpy()  # timm: argsort(noise)[:, :num_keep]
    np.testing.assert_array_equal(out[:, :2], x[:, :2])  # prefix tokens kept, in front
    np.testing.assert_array_equal(out[:, 2:], np.take_along_axis(x[:, 2:], keep[..., None], axis=1))
    dout = rng.standard_normal(out.shape)
    dx = patch_dropout_backward(dout, cache)
    expected = np.zeros_like(x)
    expected[:, :2] = dout[:, :2]
    np.put_along_axis(expected[:, 2:], keep[..., None], dout[:, 2:], axis=1)  # the scatter
    np.testing.assert_array_equal(dx, expected)


def test_model_with_patch_dropout_against_finite_differences():
    m = small(patch_drop_rate=0.5, pool="mean")
    x = np.random.default_rng(1).standard_normal((2, 1, 8, 8))
    noise = np.random.default_rng(2).random((2, 16))
    dlogits = np.random.default_rng(3).standard_normal((2, 5))
    m.forward(x, train=True, masks={"patch_drop": noise})
    assert [a.shape[-1] for a in m.attention_maps()] == [9, 9]  # 1 + 8 of the 16 patches
    dx = m.backward(dlogits)
    f = lambda: m.forward(x, train=True, masks={"patch_drop": noise})  # noqa: E731
    assert_close("dx", dx, numeric_grad(f, x, dlogits), **FD_TOLERANCE)
    assert_close("pos_embed", m.grads["pos_embed"], numeric_grad(f, m.params["pos_embed"], dlogits), **FD_TOLERANCE)
    d = m.grads["pos_embed"][0, 1:]
    assert (np.abs(d).sum(-1) == 0).sum() >= 16 - 2 * 8  # patches dropped in both images get none


def test_evaluation_is_untouched_and_draws_are_random():
    x = np.random.default_rng(4).standard_normal((2, 1, 8, 8))
    plain, dropped = small(), small(patch_drop_rate=0.5)
    np.testing.assert_array_equal(dropped.forward(x), plain.forward(x))
    a, b = dropped.forward(x, train=True), dropped.forward(x, train=True)
    assert not np.array_equal(a, b)  # a new subset every step (model.rng)


def test_bad_input():
    with pytest.raises(ValueError, match=r"patch_drop_rate must be a float in \[0, 1\)"):
        small(patch_drop_rate=1.0)
    x = np.zeros((2, 5, 4))
    with pytest.raises(ValueError, match=r"noise must be \(B, Np\) = \(2, 4\), got \(2, 5\)"):
        patch_dropout_forward(x, 0.5, True, 1, noise=np.zeros((2, 5)))
    with pytest.raises(ValueError, match="needs a random generator"):
        patch_dropout_forward(x, 0.5, True, 1)
