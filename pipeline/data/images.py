"""Reading dataset images: the one place pixels come from, so every stage sees an image the same way."""

from __future__ import annotations

import stat
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


def not_a_file(path: str | Path) -> str | None:
    """Why ``path`` cannot be opened as an image file without risk (opening a FIFO blocks forever), or None for a
    regular file (a symbolic link to one included)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return "a broken symbolic link" if path.is_symlink() else "missing image file"
    except OSError as exc:  # a symbolic link loop (ELOOP), a name too long, no permission
        return f"cannot be read ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        return f"not a regular file ({kind})"
    return None


def load_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, upright (EXIF orientation applied), decoded in full with its file closed.

    A missing, truncated or corrupt file, or one that is not a regular file, raises :class:`ImageError` naming it.
    """
    if (reason := not_a_file(path)) is not None:
        raise ImageError(f"{path}: {reason}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in SIXTEEN_BIT_MODES:
                im = to_8bit(im)
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # PIL's errors for bad files
        raise ImageError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None
