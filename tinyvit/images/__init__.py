"""Image files read right (see :mod:`tinyvit.images.read`): every pixel format scaled to [0, 1] or
refused, and the size checked from the header before anything is decoded. Shared by
``tinyvit predict`` / ``attention`` / ``eval`` and the image-folder loader of ``tinyvit train``."""

from .read import (GREY_MODES, MAX_ASPECT, MAX_PIXELS, SIXTEEN_BIT, check_size, load_image,
                   open_image, read_pixels, scaled)

__all__ = ["GREY_MODES", "MAX_ASPECT", "MAX_PIXELS", "SIXTEEN_BIT", "check_size", "load_image",
           "open_image", "read_pixels", "scaled"]
