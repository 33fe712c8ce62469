"""Reading dataset images."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def load_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as RGB, decoded in full and with its file closed."""
    with Image.open(path) as im:
        return im.convert("RGB")
