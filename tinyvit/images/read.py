"""Reading image files right: every pixel format scaled to [0, 1] or refused, and the size
checked from the header before anything is decoded. Shared by ``tinyvit predict`` /
``attention`` (:mod:`tinyvit.pretrained.preprocess`) and the image-folder loader
(:mod:`tinyvit.training.data`).

Pixel formats (Pillow modes):

- 8 bits per channel (``1``, ``L``, ``P``, ``RGB``, ``RGBA``, ``CMYK``, ``LA``, ...): Pillow
  converts to grey ``L`` or ``RGB``; a pixel ``v`` means ``v / 255``.
- 16-bit grey (``I;16``, ``I;16B``, ``I;16L``; a 16-bit PNG or TIFF): ``v / 65535``. Pillow's own
  conversion to ``L`` clips at 255 instead, which made 99.6% of a real 16-bit image white.
- 32-bit integer (``I``): ``v / 65535`` where the file says the samples are 16-bit (a PNG, a
  TIFF with ``BitsPerSample`` 16); a true 32-bit integer image has no defined range and is
  refused (save it as 8 or 16 bits, or as float in [0, 1]).
- 32-bit float (``F``): read as it is when every value lies in [0, 1]; any other range (or
  NaN/Inf) is refused. Pillow's conversion made a [0, 1] float image black.

Images of more than 8 bits come back as one Pillow ``F`` (float32) plane in [0, 1]; Pillow
has no multi-channel format deeper than 8 bits, so they are grey.

Limits, checked from the header before decoding: at most :data:`MAX_PIXELS` pixels and an
aspect ratio of at most :data:`MAX_ASPECT` (a 118-byte 40000x1 PNG would otherwise be resized
to 10,240,000 x 256 pixels by the ImageNet recipe: 10 GB).
"""
from __future__ import annotations

import os

import numpy as np

MAX_PIXELS = 64 * 2**20  # 67,108,864 pixels: 8192 x 8192
MAX_ASPECT = 32  # longer side / shorter side
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise RuntimeError("reading images needs Pillow: pip install pillow") from None
    return Image


def open_image(path):
    """Open ``path`` with Pillow, check its size from the header, then decode it.

    Raises ``FileNotFoundError`` for a missing file and one ``ValueError`` naming the file for
    anything else: not an image, truncated, more than :data:`MAX_PIXELS` pixels or an aspect
    ratio beyond :data:`MAX_ASPECT` (both before any pixel is decoded)."""
    Image = _pil()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist" if not os.path.exists(path)
                                else f"image {path!r} is not a file")
    try:
        img = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{path!r}: {exc}; tinyvit reads at most {MAX_PIXELS:,} pixels") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"{path!r} is not an image Pillow can read ({exc})") from None
    try:
        check_size(*img.size, repr(path))
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ValueError(f"{path!r} is not an image Pillow can read ({exc})") from None
    except BaseException:
        img.close()
        raise
    return img


def check_size(width: int, height: int, source: str = "image") -> None:
    """Refuse more than :data:`MAX_PIXELS` pixels or an aspect ratio beyond :data:`MAX_ASPECT`."""
    if width < 1 or height < 1:
        raise ValueError(f"{source} is {width}x{height} pixels: empty")
    if width * height > MAX_PIXELS:
        raise ValueError(f"{source} is {width}x{height} = {width * height:,} pixels, over the limit of "
                         f"{MAX_PIXELS:,} (a decompression bomb, or an image to downscale first)")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ValueError(f"{source} is {width}x{height} pixels: an aspect ratio of "
                         f"{max(width, height) / min(width, height):.0f}:1, over the limit of {MAX_ASPECT}:1 "
                         f"(resizing its shorter side would take far more memory than the image)")


def _bits_per_sample(img):
    tags = getattr(img, "tag_v2", None)
    if tags is None:
        return None
    bits = tags.get(258)
    return bits[0] if isinstance(bits, (tuple, list)) and bits else bits


def scaled(img, source: str = "image"):
    """An opened image -> itself when it has 8 bits per channel, else an ``F`` image in [0, 1]
    (see the module docstring); refuses what has no defined scale."""
    Image = _pil()
    mode = img.mode
    if mode in SIXTEEN_BIT:
        return Image.fromarray(np.asarray(img).astype(np.float32) / np.float32(65535), "F")
    if mode == "I":
        values = np.asarray(img)
        sixteen = img.format == "PNG" or _bits_per_sample(img) == 16
        if not sixteen:
            raise ValueError(f"{source}: 32-bit integer pixels (values {values.min()} to {values.max()}) have no defined "
                             f"range (0-255? 0-65535?); save the image with 8 or 16 bits, or as float in [0, 1]")
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"{source}: 16-bit pixels outside 0-65535 ({values.min()} to {values.max()})")
        return Image.fromarray(values.astype(np.float32) / np.float32(65535), "F")
    if mode == "F":
        values = np.asarray(img)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{source}: a float image with NaN/Inf pixels")
        if values.size and (values.min() < 0.0 or values.max() > 1.0):
            raise ValueError(f"{source}: a float image with values {values.min():g} to {values.max():g}; tinyvit reads "
                             f"float images as [0, 1] (scale it, or save it with 8 or 16 bits)")
        return img
    return img


def load_image(path, mode: str = "RGB"):
    """An image file -> a Pillow image: ``mode`` (``"RGB"`` or ``"L"``) for 8-bit sources, or an
    ``F`` image in [0, 1] for deeper ones (16-bit, float, 16-bit-in-32). Limits and refusals:
    :func:`open_image`, :func:`scaled`."""
    path = os.fspath(path)
    img = scaled(open_image(path), repr(path))
    if img.mode == "F":
        return img
    try:
        return img.convert(mode)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path!r}: cannot convert its {img.mode} pixels to {mode} ({exc})") from None


def read_pixels(path) -> tuple:
    """An image file -> ``(pixels, grey)``: float32 ``(H, W)`` (grey) or ``(H, W, 3)`` in [0, 1]."""
    path = os.fspath(path)
    img = open_image(path)
    grey = img.mode in GREY_MODES
    img = scaled(img, repr(path))
    if img.mode == "F":
        return np.asarray(img, dtype=np.float32), True
    try:
        img = img.convert("L" if grey else "RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path!r}: cannot convert its {img.mode} pixels ({exc})") from None
    return np.asarray(img, dtype=np.float32) / np.float32(255.0), grey
