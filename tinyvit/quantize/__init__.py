"""``tinyvit quantize``: INT8 post-training quantisation, and quantisation-aware fine-tuning.

- ``ptq.py``      calibration (min-max, percentile), :func:`quantize_model`, the int8 file
  (``save_quantized``; ``tinyvit.load_pretrained`` and ``tinyvit predict / attention / eval`` read it)
- ``qat.py``      fake-quantised fine-tuning with the straight-through estimator (``prepare_qat``, ``finetune``)
- ``command.py``  ``tinyvit quantize --weights CKPT --out Q.safetensors``

The int8 arithmetic itself (per-channel weights, int32 accumulation, fake quantisation and its
backward) is in :mod:`tinyvit.layers.quant`; the derivation in ``docs/quantization.md``.
"""
from .ptq import calibrate, linear_keys, quantize_model, save_quantized
from .qat import convert, finetune, prepare_qat

__all__ = ["calibrate", "convert", "finetune", "linear_keys", "prepare_qat", "quantize_model", "save_quantized", "register"]


def register(subparsers) -> None:
    from .command import register as _register

    _register(subparsers)
