"""tinyvit: a Vision Transformer with hand-written forward and backward passes, on NumPy or CuPy.

Not to be confused with the TinyViT model family (timm's ``tiny_vit``): this is a
from-scratch, no-autograd engine for learning, testing and benchmarking ViTs.

The package: ``layers/`` (every forward and backward), ``model.py`` (the flat script over
them), ``backend.py`` (NumPy or CuPy); around them ``training/`` (``tinyvit train``),
``pretrained/`` (other libraries' weights, ``predict``, ``attention``), ``benchmark/``
(``tinyvit bench`` and the FLOP counter) and ``cli.py`` (the command line).
"""
from .backend import Backend, array_module, cupy_available, get_backend, to_host
from .layers.loss import cross_entropy_backward, cross_entropy_forward, softmax_cross_entropy
from .model import ViTConfig, VisionTransformer, init_params, param_shapes
from .pretrained.weights import export_pretrained, load_pretrained, resample_pos_embed
import sys as _sys

from .benchmark import flops

# ``tinyvit.flops`` is a public name: importable as a module too, though it lives with the benchmarks
_sys.modules[__name__ + ".flops"] = flops

__version__ = "0.1.0"

__all__ = [
    "Backend", "ViTConfig", "VisionTransformer", "array_module", "cross_entropy_backward",
    "cross_entropy_forward", "cupy_available", "export_pretrained", "flops", "get_backend", "init_params",
    "load_pretrained", "param_shapes", "resample_pos_embed", "softmax_cross_entropy", "to_host",
]
