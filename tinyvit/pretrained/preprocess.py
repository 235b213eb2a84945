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

import json
import math
import os
from dataclasses import asdict, dataclass
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


def load_image(path, mode: str = "RGB"):
    """An image file -> a ``PIL.Image`` in ``mode`` (``"RGB"`` or ``"L"``), or ``F`` in [0, 1] for
    16-bit, float and 16-bit-in-32 sources; sizes checked before decoding
    (:func:`tinyvit.images.load_image`). Raises ``FileNotFoundError`` / ``ValueError`` naming the file."""
    from ..images import load_image as read

    return read(path, mode)


def resize_shorter(img, size: int, interpolation: str = "bilinear"):
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
    return img.resize((new_w, new_h), _filter(interpolation))


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
    """RGB or grey ``PIL.Image`` -> ``uint8 (C, H, W)`` (C = 3 or 1)."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        return arr[None].copy()  # (H, W) -> (1, H, W)
    return arr.transpose(2, 0, 1).copy()  # (H, W, C) -> (C, H, W)


def normalize(x: np.ndarray, mean, std) -> np.ndarray:
    """``(x - mean) / std`` per channel of ``x: (C, H, W)``, in x's dtype (float32 stays float32)."""
    m = np.asarray(mean, dtype=x.dtype).reshape(-1, 1, 1)  # (C, 1, 1)
    s = np.asarray(std, dtype=x.dtype).reshape(-1, 1, 1)
    return (x - m) / s


class Preprocessed(NamedTuple):
    pixels: np.ndarray  # (C, S, S) float32, normalised: what the model reads
    image: object  # the resized and cropped RGB PIL.Image (S x S): what the model sees, for drawing


def preprocess(img, recipe: str = "tutorial", image_size: int = 224, channels: int = 3) -> Preprocessed:
    """A PIL image (or a path) -> :class:`Preprocessed` for a model of ``image_size``.

    ``recipe`` is ``"tutorial"`` (Resize(S/0.875) + CenterCrop(S) + ImageNet mean/std)
    or ``"hf"`` (resize to S x S + mean/std 0.5); see the module docstring.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not isinstance(img, (str, os.PathLike)) and not hasattr(img, "convert"):
        raise TypeError(f"img must be a PIL image or a path, got {type(img).__name__}")
    return Preprocessing.recipe(recipe, image_size, channels)(img)


# ------------------------------------------------------------------ a model's own preprocessing
RESIZES = ("shorter_crop", "stretch")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def _filter(name: str):
    Image = _pil()
    return {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[name]


@dataclass(frozen=True)
class Preprocessing:
    """How a model's input is made from an image file, stored in every file tinyvit writes.

    ``resize``: ``"shorter_crop"`` (shorter side to ``floor(S / crop_pct)``, then a centre
    crop of ``S``: torchvision's evaluation) or ``"stretch"`` (resize to ``H x W``, aspect
    not kept: Hugging Face's, and what a model trained here saw: all its images had one
    size). ``channels``: 1 (grey, Pillow's ``L``) or 3 (RGB). Pixels are scaled to
    [0, 1], then ``(x - mean) / std`` per channel. ``name`` says where the numbers came
    from (``"tutorial"``, ``"hf"``, ``"trained"``: the training set's statistics).
    """

    image_size: tuple  # (H, W)
    channels: int
    mean: tuple
    std: tuple
    resize: str = "stretch"
    crop_pct: float = CROP_PCT
    name: str = "custom"
    interpolation: str = "bilinear"  # Pillow's filter for the resize: bilinear, bicubic or nearest

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
            size = (int(size), int(size))
        size = tuple(int(v) for v in size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"preprocessing image_size must be (height, width) > 0, got {self.image_size!r}")
        object.__setattr__(self, "image_size", size)
        if self.channels not in (1, 3):
            raise ValueError(f"preprocessing channels must be 1 (grey) or 3 (RGB), got {self.channels!r}")
        for name in ("mean", "std"):
            v = tuple(float(x) for x in getattr(self, name))
            if len(v) != self.channels or not all(math.isfinite(x) for x in v):
                raise ValueError(f"preprocessing {name} must be {self.channels} finite numbers, got {v}")
            object.__setattr__(self, name, v)
        if min(self.std) <= 0:
            raise ValueError(f"preprocessing std must be > 0, got {self.std}")
        if self.resize not in RESIZES:
            raise ValueError(f"preprocessing resize must be one of {RESIZES}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"preprocessing interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if not 0 < float(self.crop_pct) <= 1:
            raise ValueError(f"preprocessing crop_pct must lie in (0, 1], got {self.crop_pct!r}")

    @classmethod
    def recipe(cls, name: str, image_size, channels: int = 3) -> Preprocessing:
        """The named recipes: ``"tutorial"`` (ImageNet mean/std, shorter side + crop) and ``"hf"``."""
        if name not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {name!r}")
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if name == "tutorial" else (HF_MEAN, HF_STD)
        if channels == 1:  # a grey model: one channel's worth (the mean of the three)
            mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
        return cls(image_size, channels, mean, std, "shorter_crop" if name == "tutorial" else "stretch",
                   CROP_PCT, name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"], d["mean"], d["std"] = list(self.image_size), list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d, source: str = "preprocessing") -> Preprocessing:
        if isinstance(d, str):
            try:
                d = json.loads(d)
            except ValueError as exc:
                raise ValueError(f"{source}: not JSON ({exc})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        known = {"image_size", "channels", "mean", "std", "resize", "crop_pct", "name", "interpolation"}
        unknown = sorted(set(d) - known)
        missing = sorted({"image_size", "channels", "mean", "std"} - set(d))
        if unknown or missing:
            raise ValueError(f"{source}: {'unknown fields ' + str(unknown) if unknown else ''}"
                             f"{'; ' if unknown and missing else ''}{'missing ' + str(missing) if missing else ''}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    def describe(self) -> str:
        how = (f"shorter side {math.floor(self.image_size[0] / self.crop_pct)}, centre crop "
               if self.resize == "shorter_crop" else "resize to ")
        fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        how += "" if self.interpolation == "bilinear" else f"({self.interpolation}) "
        return (f"{self.name}: {how}{self.image_size[0]}x{self.image_size[1]}, "
                f"{'grey' if self.channels == 1 else 'RGB'}, [0, 1], mean {fmt(self.mean)}, std {fmt(self.std)}")

    def __call__(self, img) -> Preprocessed:
        """A PIL image or a path -> :class:`Preprocessed` ``(C, H, W)`` float32."""
        from ..images import check_size, scaled

        mode = "L" if self.channels == 1 else "RGB"
        if isinstance(img, (str, os.PathLike)):
            img = load_image(img, mode)
        elif not hasattr(img, "convert"):
            raise TypeError(f"img must be a PIL image or a path, got {type(img).__name__}")
        else:
            check_size(*img.size)
            img = scaled(img)
        if img.mode != "F" and img.mode != mode:
            img = img.convert(mode)
        height, width = self.image_size
        Image = _pil()
        if self.resize == "shorter_crop":
            if height != width:
                raise ValueError(f"the shorter-side-and-crop recipe makes square images; this model expects "
                                 f"{height}x{width}")
            img = center_crop(resize_shorter(img, math.floor(height / self.crop_pct), self.interpolation), height)
        elif img.size != (width, height):
            img = img.resize((width, height), _filter(self.interpolation))
        if img.mode == "F":  # a 16-bit or float source, already in [0, 1]; grey (Pillow has no deeper colour)
            x = np.asarray(img, dtype=np.float32)[None]  # (1, H, W)
            x = np.repeat(x, self.channels, axis=0)  # (C, H, W)
            shown = Image.fromarray(np.round(x[0] * 255).astype(np.uint8), "L").convert("RGB")
            return Preprocessed(normalize(x, self.mean, self.std), shown)
        if self.name == "hf":
            x = (to_chw(img).astype(np.float64) * (1 / 255)).astype(np.float32)  # Hugging Face: float64 rescale
        else:
            x = to_chw(img).astype(np.float32) / np.float32(255.0)  # torchvision and tinyvit's loaders: float32
        return Preprocessed(normalize(x, self.mean, self.std), img)
