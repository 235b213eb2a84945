"""Augmentations on host batches: exact definitions, Mixup/CutMix against a PyTorch
rendering of timm's batch-mode ``Mixup``, invariants, and that inputs are never written."""
import numpy as np
import pytest
import torch

from tinyvit.training import augment
from tinyvit.training.augment import RAND_OPS, cutmix, mix_batch, mixup, rand_augment, random_crop, random_flip


def batch(b=5, c=2, h=6, w=7, seed=0):
    return np.random.default_rng(seed).random((b, c, h, w)).astype(np.float32)


def test_random_crop_is_a_window_of_the_padded_image():
    x = batch()
    keep = x.copy()
    out = random_crop(x, np.random.default_rng(1), padding=2, fill=0.5)
    assert out.shape == x.shape and out.dtype == x.dtype and np.array_equal(x, keep)
    rng = np.random.default_rng(1)
    top, left = rng.integers(0, 5, 5), rng.integers(0, 5, 5)
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=0.5)
    for i in range(5):
        assert np.array_equal(out[i], padded[i, :, top[i]:top[i] + 6, left[i]:left[i] + 7])
    assert np.array_equal(random_crop(x, np.random.default_rng(0), 0), x)
    with pytest.raises(ValueError, match="padding"):
        random_crop(x, rng, -1)


def test_random_flip():
    x = batch()
    assert np.array_equal(random_flip(x, np.random.default_rng(0), p=1.0), x[..., ::-1])
    assert np.array_equal(random_flip(x, np.random.default_rng(0), p=0.0), x)
    out = random_flip(x, np.random.default_rng(3), p=0.5)
    flipped = [np.array_equal(o, xi[..., ::-1]) for o, xi in zip(out, x)]
    kept = [np.array_equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))


def torch_mixup(x, y, k, lam):
    """timm's ``Mixup._mix_batch`` + ``mixup_target`` (without smoothing), in torch."""
    x = torch.tensor(x)
    mixed = x * lam + x.flip(0) * (1 - lam)
    hot = torch.nn.functional.one_hot(torch.tensor(y), k).double()
    return mixed.numpy(), (hot * lam + hot.flip(0) * (1 - lam)).numpy()


def test_mixup_matches_timm_rule():
    x, y = batch(), np.array([0, 1, 2, 1, 0])
    out, targets, lam = mixup(x, y, 3, np.random.default_rng(0), alpha=0.8)
    ref_x, ref_t = torch_mixup(x, y, 3, lam)
    np.testing.assert_allclose(out, ref_x, rtol=1e-6)
    np.testing.assert_allclose(targets, ref_t, rtol=1e-12)
    assert out.dtype == np.float32 and np.allclose(targets.sum(1), 1.0)


def test_cutmix_box_and_lambda():
    x, y = batch(h=8, w=8), np.array([0, 1, 2, 1, 0])
    rng = np.random.default_rng(2)
    out, targets, lam = cutmix(x, y, 3, rng, alpha=1.0)
    changed = np.any(out != x, axis=(0, 1))  # (H, W): the pasted box (where the reversed batch differs)
    box = np.argwhere(changed)
    if box.size:
        (y0, x0), (y1, x1) = box.min(0), box.max(0) + 1
        assert changed[y0:y1, x0:x1].all()
        assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 64)
        np.testing.assert_array_equal(out[:, :, y0:y1, x0:x1], x[::-1, :, y0:y1, x0:x1])
    hot = np.eye(3)[y]
    np.testing.assert_allclose(targets, lam * hot + (1 - lam) * hot[::-1])


def test_mix_batch_policy():
    x, y = batch(), np.array([0, 1, 2, 1, 0])
    out, t = mix_batch(x, y, 3, np.random.default_rng(0))
    assert out is x and np.array_equal(t, np.eye(3)[y])
    for seed in range(6):
        out, t = mix_batch(x, y, 3, np.random.default_rng(seed), mixup_alpha=0.8, cutmix_alpha=1.0)
        assert out.shape == x.shape and np.allclose(t.sum(1), 1.0) and (t >= 0).all()


def test_rand_augment_shapes_determinism_and_no_writes():
    x = batch(b=8, c=1, h=8, w=8)
    keep = x.copy()
    a = rand_augment(x, np.random.default_rng(0), num_ops=2, magnitude=9)
    b = rand_augment(x, np.random.default_rng(0), num_ops=2, magnitude=9)
    assert a.shape == x.shape and a.dtype == x.dtype and np.array_equal(a, b) and np.array_equal(x, keep)
    assert not np.array_equal(a, x)
    assert np.array_equal(rand_augment(x, np.random.default_rng(0), ops=("identity",)), x)
    for name in RAND_OPS:
        out = rand_augment(x, np.random.default_rng(1), num_ops=1, magnitude=10, ops=(name,))
        assert np.isfinite(out).all() and out.min() >= -1e-6 and out.max() <= 1 + 1e-6, name
        zero = rand_augment(x, np.random.default_rng(1), num_ops=1, magnitude=0, ops=(name,))
        if name not in ("autocontrast", "solarize"):
            np.testing.assert_allclose(zero, x, atol=1e-6, err_msg=f"{name} at magnitude 0 must be the identity")


def test_rotate_by_ninety_degrees_is_rot90():
    im = batch(b=1, c=1, h=5, w=5)[0]
    out = augment._rotate(im, 3.0, 0.0)  # magnitude 3 -> 90 degrees
    assert any(np.allclose(out, np.rot90(im, k, axes=(1, 2)), atol=1e-6) for k in (1, -1))


def test_bad_inputs():
    with pytest.raises(TypeError, match="float images"):
        random_crop(np.zeros((2, 1, 4, 4), np.uint8), np.random.default_rng(0), 1)
    with pytest.raises(TypeError, match="float images"):
        rand_augment(np.zeros((1, 4, 4)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="magnitude"):
        rand_augment(batch(), np.random.default_rng(0), magnitude=11)
    with pytest.raises(ValueError, match="unknown"):
        rand_augment(batch(), np.random.default_rng(0), ops=("sharpen",))
