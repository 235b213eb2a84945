"""tinyvit: a Vision Transformer with hand-written forward and backward passes, on NumPy or CuPy.

Not to be confused with the TinyViT model family (timm's ``tiny_vit``): this is a
from-scratch, no-autograd engine for learning, testing and benchmarking ViTs.
"""
from .backend import Backend, array_module, cupy_available, get_backend, to_host
from .loss import cross_entropy_backward, cross_entropy_forward, softmax_cross_entropy
from .model import ViTConfig, VisionTransformer, init_params, param_shapes

__version__ = "0.1.0"

__all__ = [
    "Backend", "ViTConfig", "VisionTransformer", "array_module", "cross_entropy_backward",
    "cross_entropy_forward", "cupy_available", "get_backend", "init_params", "param_shapes",
    "softmax_cross_entropy", "to_host",
]
