"""Image preprocessing for pretrained ViTs, with Pillow: the two recipes people use.

``"tutorial"`` (torchvision's ImageNet evaluation, the tutorial's section 5)::

    Resize(256)            shorter side -> 256, aspect kept (PIL bilinear, which antialiases)
    CenterCrop(224)        offsets round((H - 224) / 2), round((W - 224) / 2)
    ToTensor()             uint8 (H, W, C) -> float32 (C, H, W) / 255
    Normalize(mean, std)   ImageNet mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)

``"hf"`` (Hugging Face's ``ViTImageProcessor``)::

    resize to 224 x 224    (PIL bilinear, aspect not kept), rescale by 1/255, normalize mean = std = 0.5

For another model size S, the tutorial recipe resizes to ``floor(S / 0.875)`` (224 ->
256, timm's ``crop_pct``) and crops S; the Hugging Face recipe resizes to S.

Each step repeats the reference library's arithmetic (torchvision divides in float32;
Hugging Face multiplies by 1/255 in float64, then casts), so the outputs agree to the
last bit on the same image (tested against both).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HF_MEAN = (0.5, 0.5, 0.5)
HF_STD = (0.5, 0.5, 0.5)
RECIPES = ("tutorial", "hf")
CROP_PCT = 0.875  # 224 / 256


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise RuntimeError("image preprocessing needs Pillow: pip install pillow (or 'tinyvit[pretrained]')") from None
    return Image


def load_image(path):
    """An image file -> an RGB ``PIL.Image`` (grey, palette, RGBA, CMYK are converted).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing or
    not an image Pillow can decode (truncated files included).
    """
    Image = _pil()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist" if not os.path.exists(path)
                                else f"image {path!r} is not a file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"{path!r} is not an image Pillow can read ({exc})") from None


def resize_shorter(img, size: int):
    """torchvision ``Resize(size)`` on a PIL image: the shorter side becomes ``size``.

    The longer side is ``int(size * long / short)`` (truncated, as torchvision does).
    """
    Image = _pil()
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BILINEAR)


def center_crop(img, size: int):
    """torchvision ``CenterCrop(size)`` on a PIL image; pads with black first if it is smaller."""
    w, h = img.size
    if w < size or h < size:  # torchvision pads (left/top get the floor half), then crops
        Image = _pil()
        pad_w, pad_h = max(size - w, 0), max(size - h, 0)
        canvas = Image.new(img.mode, (w + pad_w, h + pad_h))
        canvas.paste(img, (pad_w // 2, pad_h // 2))
        img, (w, h) = canvas, canvas.size
        if (w, h) == (size, size):
            return img
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_chw(img) -> np.ndarray:
    """RGB ``PIL.Image`` -> ``uint8 (C, H, W)``."""
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()  # (H, W, C) -> (C, H, W)


def normalize(x: np.ndarray, mean, std) -> np.ndarray:
    """``(x - mean) / std`` per channel of ``x: (C, H, W)``, in x's dtype (float32 stays float32)."""
    m = np.asarray(mean, dtype=x.dtype).reshape(-1, 1, 1)  # (C, 1, 1)
    s = np.asarray(std, dtype=x.dtype).reshape(-1, 1, 1)
    return (x - m) / s


class Preprocessed(NamedTuple):
    pixels: np.ndarray  # (C, S, S) float32, normalised: what the model reads
    image: object  # the resized and cropped RGB PIL.Image (S x S): what the model sees, for drawing


def preprocess(img, recipe: str = "tutorial", image_size: int = 224) -> Preprocessed:
    """A PIL image (or a path) -> :class:`Preprocessed` for a model of ``image_size``.

    ``recipe`` is ``"tutorial"`` (Resize(S/0.875) + CenterCrop(S) + ImageNet mean/std)
    or ``"hf"`` (resize to S x S + mean/std 0.5); see the module docstring.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if isinstance(img, (str, os.PathLike)):
        img = load_image(img)
    elif getattr(img, "mode", None) != "RGB":
        if not hasattr(img, "convert"):
            raise TypeError(f"img must be a PIL image or a path, got {type(img).__name__}")
        img = img.convert("RGB")
    if recipe == "tutorial":
        img = center_crop(resize_shorter(img, math.floor(image_size / CROP_PCT)), image_size)
        x = to_chw(img).astype(np.float32) / np.float32(255.0)  # torchvision: float32 division
        return Preprocessed(normalize(x, IMAGENET_MEAN, IMAGENET_STD), img)
    Image = _pil()
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    x = (to_chw(img).astype(np.float64) * (1 / 255)).astype(np.float32)  # Hugging Face: float64 rescale, then cast
    return Preprocessed(normalize(x, HF_MEAN, HF_STD), img)
