"""Data augmentation on host NumPy batches, before normalisation.

Every function takes ``images: (B, C, H, W)`` float in [0, 1] and a
``numpy.random.Generator`` (randomness is an argument) and returns new arrays; the
input is never written.

- :func:`random_crop`: pad by ``padding`` pixels (with ``fill``) and cut an ``H x W``
  window at a random offset per image (translations of up to ``padding`` pixels).
- :func:`random_flip`: mirror left-right with probability ``p`` per image.
- :func:`mixup` / :func:`cutmix` (Zhang et al. 2018; Yun et al. 2019, as timm's
  ``Mixup`` in batch mode): mix each image with the batch reversed, with
  ``lam ~ Beta(alpha, alpha)``; the targets become soft ``(B, K)`` probabilities
  ``lam * onehot(y) + (1 - lam) * onehot(y reversed)``. CutMix pastes a box of area
  ``(1 - lam) H W`` and recomputes ``lam`` from the clipped box.
- :func:`rand_augment`: a RandAugment subset (Cubuk et al. 2020): per image, ``num_ops``
  operations drawn uniformly from :data:`RAND_OPS`, each at ``magnitude`` (0-10).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def _check_images(images) -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype.kind != "f":
        raise TypeError(f"augmentations take host float images (B, C, H, W), got "
                        f"{type(images).__name__} {getattr(images, 'shape', '')} {getattr(images, 'dtype', '')}")


def random_crop(images: np.ndarray, rng, padding: int, fill: float = 0.0) -> np.ndarray:
    """``(B, C, H, W) -> (B, C, H, W)``: pad by ``padding`` on every side, crop at a random offset."""
    _check_images(images)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return images.copy()
    B, C, H, W = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (padding, padding), (padding, padding)),
                    constant_values=fill)  # (B, C, H + 2p, W + 2p)
    top = rng.integers(0, 2 * padding + 1, B)  # (B,)
    left = rng.integers(0, 2 * padding + 1, B)  # (B,)
    rows = top[:, None] + np.arange(H)  # (B, H)
    cols = left[:, None] + np.arange(W)  # (B, W)
    b = np.arange(B)[:, None, None, None]
    c = np.arange(C)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


def random_flip(images: np.ndarray, rng, p: float = 0.5) -> np.ndarray:
    """``(B, C, H, W) -> (B, C, H, W)``: each image mirrored left-right with probability ``p``."""
    _check_images(images)
    flip = rng.random(images.shape[0]) < p  # (B,)
    out = images.copy()
    out[flip] = images[flip][..., ::-1]
    return out


def one_hot(labels: np.ndarray, num_classes: int, dtype=np.float64) -> np.ndarray:
    """``(B,) int -> (B, K)``."""
    out = np.zeros((labels.shape[0], num_classes), dtype=dtype)
    out[np.arange(labels.shape[0]), labels] = 1.0
    return out


def _soft_targets(labels, num_classes, lam):
    hot = one_hot(labels, num_classes)  # (B, K)
    return lam * hot + (1.0 - lam) * hot[::-1]  # (B, K), rows sum to 1


def mixup(images: np.ndarray, labels: np.ndarray, num_classes: int, rng, alpha: float = 0.8):
    """``-> (images (B, C, H, W), soft targets (B, K) float64, lam)``: ``lam x + (1 - lam) x[::-1]``."""
    _check_images(images)
    lam = float(rng.beta(alpha, alpha))
    mixed = images * lam + images[::-1] * (1.0 - lam)  # (B, C, H, W)
    return mixed.astype(images.dtype), _soft_targets(labels, num_classes, lam), lam


def cutmix_box(height: int, width: int, lam: float, rng) -> tuple[int, int, int, int]:
    """A box ``(y0, y1, x0, x1)`` of area about ``(1 - lam) H W`` centred uniformly, clipped to the image."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    return y0, y1, x0, x1


def cutmix(images: np.ndarray, labels: np.ndarray, num_classes: int, rng, alpha: float = 1.0):
    """``-> (images, soft targets (B, K), lam)``: a box of the reversed batch pasted in; ``lam``
    is the kept area fraction of the clipped box."""
    _check_images(images)
    B, C, H, W = images.shape
    lam = float(rng.beta(alpha, alpha))
    y0, y1, x0, x1 = cutmix_box(H, W, lam, rng)
    out = images.copy()
    out[:, :, y0:y1, x0:x1] = images[::-1, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
    return out, _soft_targets(labels, num_classes, lam), lam


def draw_mix(rng, height: int, width: int, mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5):
    """timm's ``Mixup`` policy, the draws only (one per batch): ``None`` (no mixing),
    ``("mixup", lam, None)`` or ``("cutmix", lam, (y0, y1, x0, x1))`` with ``lam`` the kept share."""
    use_mix, use_cut = mixup_alpha > 0, cutmix_alpha > 0
    if not (use_mix or use_cut) or rng.random() >= prob:
        return None
    if use_cut and (not use_mix or rng.random() < switch_prob):
        lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
        y0, y1, x0, x1 = cutmix_box(height, width, lam, rng)
        return "cutmix", 1.0 - (y1 - y0) * (x1 - x0) / (height * width), (y0, y1, x0, x1)
    return "mixup", float(rng.beta(mixup_alpha, mixup_alpha)), None


def apply_mix(images, partners, labels, partner_labels, num_classes: int, mix):
    """Mix each image with its partner (in a whole batch: the batch reversed) as ``mix`` from
    :func:`draw_mix` says; ``-> (images (b, C, H, W), soft targets (b, K) float64)``. A data-parallel
    rank passes its own images and their partners from the other end of the global batch."""
    hot, partner_hot = one_hot(labels, num_classes), one_hot(partner_labels, num_classes)  # (b, K)
    if mix is None:
        return images, hot
    kind, lam, box = mix
    if kind == "mixup":
        out = (images * lam + partners * (1.0 - lam)).astype(images.dtype)
    else:
        y0, y1, x0, x1 = box
        out = images.copy()
        out[:, :, y0:y1, x0:x1] = partners[:, :, y0:y1, x0:x1]
    return out, lam * hot + (1.0 - lam) * partner_hot


def mix_batch(images, labels, num_classes, rng, mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5):
    """timm's ``Mixup`` policy: with probability ``prob`` apply CutMix (chosen with
    ``switch_prob`` when both are on) or Mixup; otherwise one-hot targets.
    ``-> (images, soft targets (B, K) float64)``."""
    _check_images(images)
    mix = draw_mix(rng, images.shape[2], images.shape[3], mixup_alpha, cutmix_alpha, prob, switch_prob)
    return apply_mix(images, images[::-1], labels, labels[::-1], num_classes, mix)


# ---------------------------------------------------------------- RandAugment subset
def _affine(image: np.ndarray, matrix: np.ndarray, fill: float) -> np.ndarray:
    """``(C, H, W)``: output pixel (r, c) reads input ``matrix @ (r, c, 1)`` (about the centre), bilinear."""
    C, H, W = image.shape
    centre = np.array([(H - 1) / 2.0, (W - 1) / 2.0])
    offset = centre - matrix @ centre
    return np.stack([ndimage.affine_transform(ch, matrix, offset=offset, order=1, mode="constant", cval=fill)
                     for ch in image])


def _rotate(im, mag, fill):
    theta = math.radians(30.0 * mag)
    m = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return _affine(im, m, fill)


def _shear_x(im, mag, fill):
    return _affine(im, np.array([[1.0, 0.0], [0.3 * mag, 1.0]]), fill)


def _shear_y(im, mag, fill):
    return _affine(im, np.array([[1.0, 0.3 * mag], [0.0, 1.0]]), fill)


def _translate(axis):
    def op(im, mag, fill):
        shift = [0.0, 0.0, 0.0]
        shift[axis] = 0.45 * mag * im.shape[axis]
        return ndimage.shift(im, shift, order=1, mode="constant", cval=fill)
    return op


def _brightness(im, mag, fill):
    return np.clip(im * (1.0 + 0.9 * mag), 0.0, 1.0)


def _contrast(im, mag, fill):
    mean = im.mean()
    return np.clip(mean + (im - mean) * (1.0 + 0.9 * mag), 0.0, 1.0)


def _solarize(im, mag, fill):
    threshold = 1.0 - abs(mag)
    return np.where(im >= threshold, 1.0 - im, im)


def _autocontrast(im, mag, fill):
    lo, hi = im.min(axis=(1, 2), keepdims=True), im.max(axis=(1, 2), keepdims=True)  # (C, 1, 1)
    return np.where(hi > lo, (im - lo) / np.maximum(hi - lo, 1e-12), im)


def _identity(im, mag, fill):
    return im


# name -> (op(image (C, H, W), signed magnitude in [-1, 1], fill), takes a random sign)
RAND_OPS = {
    "identity": (_identity, False), "autocontrast": (_autocontrast, False), "rotate": (_rotate, True),
    "shear_x": (_shear_x, True), "shear_y": (_shear_y, True), "translate_x": (_translate(2), True),
    "translate_y": (_translate(1), True), "brightness": (_brightness, True), "contrast": (_contrast, True),
    "solarize": (_solarize, False),
}


def rand_augment(images: np.ndarray, rng, num_ops: int = 2, magnitude: float = 9.0, fill: float = 0.0,
                 ops=tuple(RAND_OPS)) -> np.ndarray:
    """``(B, C, H, W) -> (B, C, H, W)``: per image, ``num_ops`` ops from ``ops`` at ``magnitude / 10``
    of each op's range (rotate 30 deg, shear 0.3, translate 0.45 of the side, brightness and
    contrast factor 1 +- 0.9, solarize threshold 1 - m), signed ops with a random sign."""
    _check_images(images)
    if not 0.0 <= magnitude <= 10.0:
        raise ValueError(f"magnitude must lie in [0, 10], got {magnitude}")
    unknown = [o for o in ops if o not in RAND_OPS]
    if unknown:
        raise ValueError(f"unknown RandAugment ops {unknown}; choose from {tuple(RAND_OPS)}")
    out = images.copy()
    for i in range(images.shape[0]):
        for name in rng.choice(list(ops), size=num_ops):
            op, signed = RAND_OPS[str(name)]
            mag = magnitude / 10.0
            if signed and rng.random() < 0.5:
                mag = -mag
            out[i] = op(out[i], mag, fill)
    return out
