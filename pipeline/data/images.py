"""Reading dataset images: the one place pixels come from, so every stage sees an image the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline.core.errors import PipelineError

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # 16-bit greyscale (PNG, TIFF); 16-bit RGB opens as 8-bit


class ImageError(PipelineError):
    """An image cannot be read; the message names the file."""


def to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit greyscale image scaled to 8 bits (65535 -> 255); ``convert`` would clip everything above 255."""
    pixels = np.asarray(im, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8), mode="L")


def load_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, upright (EXIF orientation applied), decoded in full with its file closed.

    A missing, truncated or corrupt file raises :class:`ImageError` naming it.
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in SIXTEEN_BIT_MODES:
                im = to_8bit(im)
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # PIL's errors for bad files
        raise ImageError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None
