"""Quantisation-aware fine-tuning: train through the int8 rounding with the straight-through estimator.

Derivation: docs/quantization.md ("The straight-through estimator").

``prepare_qat(model, amax)`` makes every linear layer fake-quantise its input (the calibrated
per-tensor scale, fixed) and its weight (per output channel, recomputed from the current float
weight each forward): the forward then computes exactly what the int8 model will, in float.
The backward is the clipped STE of :func:`tinyvit.layers.quant.fake_quant_backward`, so the
float master weights learn to sit well on the grid. :func:`finetune` runs a short AdamW
fine-tune; :func:`convert` rounds the result into an int8 model with the same input scales.
"""
from __future__ import annotations

import numpy as np

from ..backend import to_host
from ..layers.loss import softmax_cross_entropy
from ..layers.quant import FakeQuantWeight, Int8Weight, quantize_weight
from ..model import VisionTransformer
from .ptq import _install, calibrate, linear_keys


def prepare_qat(model, amax: dict) -> VisionTransformer:
    """Fake-quantise ``model``'s linear layers in place, with input scales ``amax[key] / 127``
    (from :func:`calibrate`); returns the model."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"prepare_qat needs a VisionTransformer, got {type(model).__name__}")
    keys = linear_keys(model)
    missing = [k for k in keys if k not in amax]
    if missing:
        raise ValueError(f"amax has no range for {missing[:4]}: calibrate the model first")
    b = model.backend
    model.quant = {k: FakeQuantWeight(None, b.asarray(np.float32(max(amax[k], 1e-12) / 127.0))) for k in keys}
    return model


def convert(model) -> VisionTransformer:
    """A QAT model -> an int8 model (a copy): its float weights quantised per channel, its input scales kept."""
    if not isinstance(model.quant, dict) or not all(isinstance(r, FakeQuantWeight) for r in model.quant.values()):
        raise ValueError("convert needs a model prepared with prepare_qat")
    q = VisionTransformer.from_config(model.config, backend=model.backend, dtype=model.dtype)
    saved, model.quant = model.quant, None
    q.load_state_dict(model.state_dict())
    model.quant = saved
    records = {}
    for key, rec in saved.items():
        w_q, w_s = quantize_weight(to_host(model.params[key]).astype(np.float32))
        records[key] = Int8Weight(q.backend.asarray(w_q), q.backend.asarray(w_s), rec.input_scale)
    _install(q, records)
    q.labels, q.preprocessing = getattr(model, "labels", None), getattr(model, "preprocessing", None)
    q.quant_info = {"weights": "int8, symmetric, per output channel", "activations": "int8, per tensor",
                    "method": "qat", "layers": list(records)}
    return q


def finetune(model, images: np.ndarray, labels: np.ndarray, steps: int = 100, lr: float = 1e-4,
             batch_size: int = 64, seed: int = 0, weight_decay: float = 0.0) -> list:
    """AdamW on a prepared (or any) model for ``steps`` steps of shuffled batches; returns the losses.

    ``images``: host ``(M, C, H, W)`` normalised; ``labels``: ``(M,)`` class indices.
    Dropout and drop path stay as the model's config says (``train=True``).
    """
    from ..training.optim import AdamW

    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    opt = AdamW(lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    order, pos, losses = rng.permutation(len(images)), 0, []
    for _ in range(steps):
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(images)), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        x = model.backend.asarray(np.ascontiguousarray(images[idx]), dtype=model.dtype)
        y = model.backend.asarray(labels[idx])
        logits = model.forward(x, train=True)
        loss, dlogits = softmax_cross_entropy(logits, y)
        model.backward(dlogits)
        opt.step(model.params, model.grads)
        losses.append(float(loss))
    return losses


__all__ = ["calibrate", "convert", "finetune", "prepare_qat"]
