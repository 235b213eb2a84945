"""Pretrained weights: read timm, torchvision and Hugging Face checkpoints, write them back,
and classify or explain an image (``tinyvit predict`` / ``tinyvit attention``).

- ``convert.py``     the three key layouts, and the config inferred from shapes
- ``weights.py``     weight files (safetensors, npz, PyTorch pickles through ``weights_only``),
                     ``load_pretrained``, ``export_pretrained``, ``resample_pos_embed``
- ``preprocess.py``  the image recipes (resize, crop, normalise), equal to torchvision's
- ``predict.py``     the ``predict`` and ``attention`` commands, attention rollout
"""
from .weights import export_pretrained, load_pretrained, resample_pos_embed

__all__ = ["export_pretrained", "load_pretrained", "resample_pos_embed"]
