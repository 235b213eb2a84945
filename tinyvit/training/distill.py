"""DeiT's hard-label distillation loss (Touvron et al. 2021), forward and backward.

Derivation: docs/cross_entropy.md (the learners' tour: examples/06_distillation.py)

A distilled student (``VisionTransformer(..., distilled=True)``) has two heads: ``head``
reads the class token and learns from the true labels, ``head_dist`` reads the
distillation token and learns from the teacher's hard decision ``argmax(teacher logits)``.
The teacher is any callable ``images -> logits (B, K)`` (for example a trained tinyvit
model's ``forward``)::

    y_t  = argmax_k teacher(x)                                       (B,)
    loss = (1 - alpha) * CE(cls_logits, y) + alpha * CE(dist_logits, y_t)

with ``alpha = 1/2`` in DeiT. ``y`` may be class indices or soft targets (Mixup/CutMix)
and label smoothing applies to the true-label term only, as timm's ``DistillationLoss``.
The backward is the two cross-entropy backwards scaled by their weights::

    dcls_logits  = (1 - alpha) * (softmax(cls_logits) - y') / B
    ddist_logits = alpha * (softmax(dist_logits) - onehot(y_t)) / B

At inference the model averages the two heads (``VisionTransformer.forward``).
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import array_module
from ..layers.loss import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward


class DistillCache(NamedTuple):
    alpha: float
    cls: CrossEntropyCache
    dist: CrossEntropyCache


def teacher_labels(teacher_logits):
    """``(B, K) -> (B,)``: the teacher's hard decisions, on the logits' backend."""
    return array_module(teacher_logits).argmax(teacher_logits, axis=1)


def hard_distillation_forward(cls_logits, dist_logits, targets, teacher_logits, alpha: float = 0.5,
                              label_smoothing: float = 0.0):
    """``cls_logits, dist_logits, teacher_logits: (B, K)``, ``targets: (B,) | (B, K)`` -> loss (0-d); cache.

    Returns ``(loss, parts, cache)`` where ``parts = (cls loss, dist loss)`` (0-d arrays)."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if tuple(teacher_logits.shape) != tuple(dist_logits.shape):
        raise ValueError(f"teacher logits must have the student's shape {tuple(dist_logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    cls_loss, cls_cache = cross_entropy_forward(cls_logits, targets, label_smoothing)
    dist_loss, dist_cache = cross_entropy_forward(dist_logits, teacher_labels(teacher_logits))
    loss = cls_loss * (1.0 - alpha) + dist_loss * alpha  # 0-d
    return loss, (cls_loss, dist_loss), DistillCache(float(alpha), cls_cache, dist_cache)


def hard_distillation_backward(cache: DistillCache, dloss: float = 1.0):
    """``-> (dcls_logits (B, K), ddist_logits (B, K))``."""
    dcls = cross_entropy_backward(cache.cls, dloss * (1.0 - cache.alpha))
    ddist = cross_entropy_backward(cache.dist, dloss * cache.alpha)
    return dcls, ddist
