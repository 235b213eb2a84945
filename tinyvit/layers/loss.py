"""Softmax cross-entropy, with label smoothing and soft (probability) targets.

Derivation: docs/cross_entropy.md (the learners' tour: examples/04_forward_backward.py)

``logits: (B, K)``, targets either class indices ``(B,)`` (integers in ``[0, K)``) or
probabilities ``(B, K)`` (Mixup/CutMix, distillation). With smoothing ``eps`` the target
distribution is ``t' = (1 - eps) * t + eps / K`` (PyTorch's rule, for both kinds)::

    log_p = logits - logsumexp(logits)          (B, K)
    loss  = -mean over B of sum_k t'_k log_p_k  scalar

Backward (softmax and log-likelihood together, the classic simplification)::

    dlogits = dloss * (softmax(logits) - t') / B
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import array_module, is_backend_array, to_host


class CrossEntropyCache(NamedTuple):
    probs: object  # (B, K): softmax of the logits
    target: object  # (B, K): the (smoothed) target distribution


def check_targets(targets, batch: int, num_classes: int) -> str:
    """Validate class indices or soft targets for a batch; return ``"index"`` or ``"soft"``.

    Reads the targets on the host (an explicit copy for device arrays): this runs at the
    edge of a step, and CuPy would otherwise wrap an out-of-range index silently.
    """
    if not is_backend_array(targets):
        raise TypeError(f"targets must be an array of class indices (B,) or probabilities (B, K), "
                        f"got {type(targets).__name__}")
    host = to_host(targets)
    if host.ndim == 1:
        if host.shape[0] != batch:
            raise ValueError(f"got {host.shape[0]} labels for a batch of {batch}")
        if host.dtype.kind not in "iu":
            raise TypeError(f"class-index labels must be integers, got dtype {host.dtype}; "
                            f"for probabilities pass a (B, K) array")
        bad = np.flatnonzero((host < 0) | (host >= num_classes))
        if bad.size:
            raise ValueError(f"labels must lie in [0, {num_classes}); {bad.size} do not, "
                             f"e.g. label {host[bad[0]]} at position {bad[0]}")
        return "index"
    if host.ndim == 2:
        if host.shape != (batch, num_classes):
            raise ValueError(f"soft targets must be (B, K) = ({batch}, {num_classes}), got {host.shape}")
        if host.dtype.kind != "f":
            raise TypeError(f"soft targets must be floating point, got dtype {host.dtype} "
                            f"(one-hot integers? pass class indices (B,) instead)")
        if not np.all(np.isfinite(host)) or np.any(host < 0) or not np.allclose(host.sum(axis=1), 1.0, atol=1e-4):
            raise ValueError("soft targets must be finite, non-negative, and each row must sum to 1")
        return "soft"
    raise ValueError(f"targets must be class indices (B,) or probabilities (B, K), got shape {host.shape}")


def cross_entropy_forward(logits, targets, label_smoothing: float = 0.0):
    """``logits: (B, K)``, ``targets: (B,) int | (B, K) float -> loss: 0-d array``; cache: probs, target."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    xp = array_module(logits)
    batch, num_classes = logits.shape
    if batch == 0:
        raise ValueError("cross-entropy over an empty batch is undefined (it would be 0/0)")
    kind = check_targets(targets, batch, num_classes)
    if kind == "index":
        target = xp.zeros((batch, num_classes), dtype=logits.dtype)  # (B, K) one-hot
        target[xp.arange(batch), xp.asarray(targets)] = 1.0
    else:
        target = xp.asarray(targets, dtype=logits.dtype)
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
    shifted = logits - logits.max(axis=1, keepdims=True)  # (B, K)
    log_sum = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))  # (B, 1)
    log_probs = shifted - log_sum  # (B, K)
    loss = -(target * log_probs).sum() / batch  # 0-d
    return loss, CrossEntropyCache(xp.exp(log_probs), target)


def cross_entropy_backward(cache: CrossEntropyCache, dloss: float = 1.0):
    """``-> dlogits: (B, K) = dloss * (probs - target) / B``."""
    batch = cache.probs.shape[0]
    return (cache.probs - cache.target) * (dloss / batch)


def softmax_cross_entropy(logits, targets, label_smoothing: float = 0.0):
    """Loss and gradient in one call: ``-> (loss 0-d array, dlogits (B, K))``."""
    loss, cache = cross_entropy_forward(logits, targets, label_smoothing)
    return loss, cross_entropy_backward(cache)
