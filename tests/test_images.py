import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import ImageError, load_rgb
from pipeline.reporting.tables import _image_data_uri

RED, BLUE = (230, 20, 20), (20, 20, 230)


def _sideways_jpeg(path):
    """A 40x20 photo stored sideways (red left half, blue right) whose EXIF says: rotate 90° clockwise to view."""
    im = Image.new("RGB", (40, 20), BLUE)
    im.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW
    im.save(path, format="JPEG", quality=95, exif=exif.tobytes())


def _close(pixel, colour, tol=40):
    return all(abs(int(a) - b) <= tol for a, b in zip(pixel, colour))


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "sideways.jpg"
    _sideways_jpeg(path)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)  # stored sideways
    im = np.asarray(load_rgb(path))
    assert im.shape == (40, 20, 3)  # upright: 20 wide, 40 tall
    assert _close(im[5, 10], RED) and _close(im[35, 10], BLUE)  # the left half is now the top


def test_gallery_shows_images_upright(tmp_path):
    path = tmp_path / "sideways.jpg"
    _sideways_jpeg(path)
    uri = _image_data_uri(str(path), size=32)
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as thumb:
        assert thumb.size == (16, 32)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    Image.fromarray(levels).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as raw:
        assert raw.mode == "I;16"
    im = np.asarray(load_rgb(tmp_path / "grey16.png"))
    assert im[0, :, 0].tolist() == [0, 1, 128, 255] and (im[..., 0] == im[..., 2]).all()


def _png_rgb16(path, pixels: np.ndarray) -> None:
    """Write a 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_rgb_is_scaled_not_clipped(tmp_path):
    pixels = np.array([[[65535, 32896, 0], [257, 1000, 60000]]], dtype=np.uint16)
    _png_rgb16(tmp_path / "rgb16.png", pixels)
    im = np.asarray(load_rgb(tmp_path / "rgb16.png"))
    assert np.abs(im.astype(int) - np.rint(pixels / 257)).max() <= 1


def test_unreadable_images_name_the_file(tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    for name in ("garbage.jpg", "missing.jpg"):
        reason = "missing image file" if name == "missing.jpg" else "unreadable image"
        with pytest.raises(ImageError, match=f"^{tmp_path / name}: {reason}"):
            load_rgb(tmp_path / name)
