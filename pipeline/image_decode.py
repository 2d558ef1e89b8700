"""Decoding an image file into the 8-bit RGB picture st works from (caching, generated conditioning images).

Every image becomes 8-bit RGB the way SimpleTuner's loader sees it, after EXIF orientation: 16-bit and 32-bit integer
greys are rescaled (0..65535 -> 0..255), float greys are read as 0..1, and anything with transparency (RGBA, LA, PA,
palette or grey with a transparent colour) is composited on a white background. 16-bit RGB(A) files are reduced to
8 bits by Pillow.
"""

from __future__ import annotations

import io

# Transparent pixels show this colour (SimpleTuner composites on white too).
BACKGROUND = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def decode_rgb(data: bytes):
    """The image in `data` as 8-bit RGB after EXIF orientation: wide greys rescaled, transparency on BACKGROUND."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as opened:
        img = ImageOps.exif_transpose(opened)
    if img.mode in _WIDE_GREY_MODES or img.mode == "F":
        return _wide_grey_to_rgb(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return _composite(img.convert("RGBA"))
    return img.convert("RGB")


def _composite(rgba):
    from PIL import Image

    canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _wide_grey_to_rgb(img):
    """16/32-bit integer greys (0..65535, as 16-bit PNG and TIFF hold them) and float greys (0..1) as 8-bit RGB. A
    transparent grey value (PNG tRNS) is composited like an alpha channel."""
    import numpy as np
    from PIL import Image

    raw = np.asarray(img)
    if img.mode == "F":
        levels = np.nan_to_num(raw.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0).clip(0.0, 1.0) * 255.0
    else:
        levels = raw.astype(np.float64).clip(0, 65535) * (255.0 / 65535.0)
    grey = Image.fromarray(np.rint(levels).astype(np.uint8), mode="L")
    transparent = img.info.get("transparency")
    if isinstance(transparent, int) and img.mode != "F":
        alpha = Image.fromarray(np.where(raw == transparent, 0, 255).astype(np.uint8), mode="L")
        return _composite(Image.merge("LA", (grey, alpha)).convert("RGBA"))
    return grey.convert("RGB")
