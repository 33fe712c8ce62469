"""Render a fashion photo stand-in from parsed caption attributes, so every stated attribute is visible.

A front-facing figure on a 128-unit canvas: garment shapes are masks filled with a fabric texture (denim twill, knit
ribs, fur speckle, dark leather with sheen, pale chiffon, ...) and a pattern overlay (stripes, lattice, flowers, a
graphic, colour blocks). Sleeve and leg lengths, the neckline cut, the outer layer and accessories (hat, glasses,
neckwear, bracelet, ring, belt or waist cloth, socks) are drawn where they sit. Colours that captions do not state are
random per image; everything a caption states is drawn deterministically from it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.attributes import Garment, Outfit

UNIT = 128  # drawing coordinates; the image is rendered at 2x its final size and downsampled
SLEEVE_FRACTION = {"sleeveless": 0.0, "short": 0.3, "medium": 0.6, "long": 1.0, None: 0.3}
LOWER_FRACTION = {"three-point": 0.25, "short": 0.4, "medium": 0.55, "three-quarter": 0.75, "long": 1.0, None: 0.55}
SKIN_TONES = [(241, 194, 167), (224, 172, 138), (198, 134, 100), (141, 85, 58), (255, 219, 190)]
TORSO = (48, 32, 80, 72)
ARM_TOP, ARM_BOTTOM = 34, 76
LEG_TOP, LEG_BOTTOM = 72, 118
LEFT_ARM, RIGHT_ARM = (38, 47), (81, 90)
LEFT_LEG, RIGHT_LEG = (50, 63), (65, 78)


def _colour(rng: np.random.Generator, fabric: str | None) -> tuple[int, int, int]:
    if fabric == "denim":
        return tuple(int(v) for v in (rng.integers(30, 80), rng.integers(60, 110), rng.integers(140, 200)))
    if fabric == "leather":
        v = int(rng.integers(20, 60))
        return (v + 15, v, v - 5 if v > 5 else 0)
    if fabric == "furry":
        return tuple(int(v) for v in (rng.integers(190, 230), rng.integers(160, 200), rng.integers(120, 160)))
    rgb = rng.integers(40, 230, size=3)
    if fabric == "chiffon":
        rgb = (rgb + 2 * 240) // 3
    return tuple(int(v) for v in rgb)


def _contrast(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (250, 250, 245) if lum < 120 else (25, 25, 35)


def _texture(size: int, garment: Garment, rng: np.random.Generator) -> Image.Image:
    """Full-canvas RGB fill for one garment: fabric texture, then pattern overlay."""
    base = _colour(rng, garment.fabric)
    arr = np.empty((size, size, 3), np.float32)
    arr[:] = base
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) * (UNIT / size)
    fabric = garment.fabric
    if fabric == "denim":
        arr *= (1.0 - 0.25 * (((xx + yy) // 2) % 2))[..., None]
    elif fabric == "knitting":
        arr *= (1.0 - 0.3 * ((xx // 2) % 2))[..., None]
    elif fabric == "furry":
        arr += rng.normal(0, 35, size=(size, size, 1))
    elif fabric == "leather":
        arr += (60 * np.exp(-((xx - yy * 0.3 - 40) % 40 - 20) ** 2 / 30))[..., None]
    elif fabric in ("mixed", "other"):
        arr *= (1.0 - 0.2 * ((yy // 6 + xx // 6) % 2))[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    _pattern(img, garment.pattern, base, rng)
    return img


def _pattern(img: Image.Image, pattern: str | None, base: tuple[int, int, int], rng: np.random.Generator) -> None:
    draw = ImageDraw.Draw(img)
    s = img.size[0] / UNIT
    ink = _contrast(base)
    if pattern == "striped":
        for y in range(0, UNIT, 6):
            draw.rectangle([0, y * s, img.size[0], (y + 2.5) * s], fill=ink)
    elif pattern == "lattice":
        for v in range(0, UNIT, 7):
            draw.rectangle([v * s, 0, (v + 1.2) * s, img.size[1]], fill=ink)
            draw.rectangle([0, v * s, img.size[0], (v + 1.2) * s], fill=ink)
    elif pattern == "floral":
        petal = tuple(int(c) for c in rng.integers(150, 256, size=3))
        for _ in range(220):
            x, y = rng.uniform(0, UNIT, size=2)
            draw.ellipse([(x - 2) * s, (y - 2) * s, (x + 2) * s, (y + 2) * s], fill=petal)
            draw.ellipse([(x - 0.8) * s, (y - 0.8) * s, (x + 0.8) * s, (y + 0.8) * s], fill=ink)
    elif pattern == "graphic":
        cx, cy = 64, 50
        shape = int(rng.integers(3))
        box = [(cx - 9) * s, (cy - 9) * s, (cx + 9) * s, (cy + 9) * s]
        if shape == 0:
            draw.ellipse(box, fill=ink)
        elif shape == 1:
            draw.rectangle(box, fill=ink)
        else:
            draw.polygon([(cx * s, (cy - 10) * s), ((cx - 10) * s, (cy + 8) * s), ((cx + 10) * s, (cy + 8) * s)],
                         fill=ink)
        cy2 = 95
        draw.rectangle([(cx - 6) * s, (cy2 - 3) * s, (cx + 6) * s, (cy2 + 3) * s], fill=ink)
    elif pattern == "color_block":
        other = tuple(int(c) for c in rng.integers(30, 230, size=3))
        draw.rectangle([64 * s, 0, img.size[0], img.size[1]], fill=other)
        draw.rectangle([0, 100 * s, 64 * s, img.size[1]], fill=other)
    elif pattern == "mixed":
        for _ in range(40):
            pts = [tuple(rng.uniform(0, UNIT, size=2) * s) for _ in range(3)]
            draw.polygon(pts, fill=tuple(int(c) for c in rng.integers(0, 256, size=3)))


class _Canvas:
    """A 2x-supersampled drawing surface with unit coordinates."""

    def __init__(self, size: int, background: tuple[int, int, int]):
        self.size = size * 2
        self.scale = self.size / UNIT
        self.image = Image.new("RGB", (self.size, self.size), background)
        self.draw = ImageDraw.Draw(self.image)

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [x0 * self.scale, y0 * self.scale, x1 * self.scale, y1 * self.scale]

    def pts(self, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x * self.scale, y * self.scale) for x, y in points]

    def mask(self) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        m = Image.new("L", (self.size, self.size), 0)
        return m, ImageDraw.Draw(m)

    def fill(self, mask: Image.Image, garment: Garment, rng: np.random.Generator) -> None:
        self.image.paste(_texture(self.size, garment, rng), (0, 0), mask)


def render_outfit(outfit: Outfit, size: int, seed: int, gender: str | None = None) -> Image.Image:
    """Draw ``outfit`` as a ``size``x``size`` RGB image; ``seed`` fixes the unstated colours."""
    rng = np.random.default_rng(seed)
    gender = outfit.gender or gender or "female"
    bg = tuple(int(v) for v in rng.integers(205, 250, size=3))
    c = _Canvas(size, bg)
    skin = SKIN_TONES[int(rng.integers(len(SKIN_TONES)))]
    hair = tuple(int(v) for v in rng.integers(10, 120, size=3))
    d = c.draw

    # body: hair behind head, head, neck, arms, torso, legs, shoes
    if gender == "female":
        d.ellipse(c.box(52, 6, 76, 42), fill=hair)
    d.ellipse(c.box(55, 9, 73, 27), fill=skin)
    if gender == "male":
        d.chord(c.box(55, 8, 73, 22), 180, 360, fill=hair)
    d.rectangle(c.box(61, 26, 67, 33), fill=skin)
    for x0, x1 in (LEFT_ARM, RIGHT_ARM):
        d.rectangle(c.box(x0, ARM_TOP, x1, ARM_BOTTOM), fill=skin)
        d.ellipse(c.box(x0 - 0.5, ARM_BOTTOM - 2, x1 + 0.5, ARM_BOTTOM + 7), fill=skin)
    d.rectangle(c.box(*TORSO), fill=skin)
    for x0, x1 in (LEFT_LEG, RIGHT_LEG):
        d.rectangle(c.box(x0, LEG_TOP, x1, LEG_BOTTOM), fill=skin)
        d.rectangle(c.box(x0 - 1, LEG_BOTTOM, x1 + 2, LEG_BOTTOM + 5), fill=(35, 30, 30))

    if outfit.socks:
        sock = tuple(int(v) for v in rng.integers(180, 256, size=3))
        for x0, x1 in (LEFT_LEG, RIGHT_LEG):
            d.rectangle(c.box(x0, LEG_BOTTOM - 7, x1, LEG_BOTTOM), fill=sock)

    if outfit.lower is not None:
        _draw_lower(c, outfit, rng)
    if outfit.upper is not None:
        _draw_upper(c, outfit, rng)
    if outfit.outer is not None:
        m, md = c.mask()
        md.rectangle(c.box(46, 31, 57, 76), fill=255)
        md.rectangle(c.box(71, 31, 82, 76), fill=255)
        for x0, x1 in (LEFT_ARM, RIGHT_ARM):
            md.rectangle(c.box(x0 - 1, ARM_TOP - 1, x1 + 1, ARM_BOTTOM - 1), fill=255)
        c.fill(m, outfit.outer, rng)
        d.line(c.pts([(57, 31), (57, 76)]), fill=(20, 20, 20), width=max(1, int(c.scale)))
        d.line(c.pts([(71, 31), (71, 76)]), fill=(20, 20, 20), width=max(1, int(c.scale)))

    _draw_accessories(c, outfit, rng)
    return c.image.resize((size, size), Image.LANCZOS)


def _draw_lower(c: _Canvas, outfit: Outfit, rng: np.random.Generator) -> None:
    frac = LOWER_FRACTION.get(outfit.lower_length, 0.55)
    bottom = LEG_TOP + frac * (LEG_BOTTOM - LEG_TOP)
    m, md = c.mask()
    if outfit.lower.kind == "skirt":
        flare = 4 + 10 * frac
        md.polygon(c.pts([(49, LEG_TOP - 2), (79, LEG_TOP - 2), (79 + flare, bottom), (49 - flare, bottom)]), fill=255)
    else:
        md.rectangle(c.box(49, LEG_TOP - 2, 79, LEG_TOP + 6), fill=255)
        for x0, x1 in (LEFT_LEG, RIGHT_LEG):
            md.rectangle(c.box(x0 - 1, LEG_TOP, x1 + 1, bottom), fill=255)
    c.fill(m, outfit.lower, rng)


def _draw_upper(c: _Canvas, outfit: Outfit, rng: np.random.Generator) -> None:
    neckline = outfit.neckline
    sleeve = outfit.sleeve or ("sleeveless" if outfit.upper.kind == "tank" else None)
    m, md = c.mask()
    top = 46 if neckline == "suspenders" else 31
    md.rectangle(c.box(47, top, 81, 74), fill=255)
    if neckline == "suspenders":
        md.rectangle(c.box(52, 31, 56, 46), fill=255)
        md.rectangle(c.box(72, 31, 76, 46), fill=255)
    frac = SLEEVE_FRACTION.get(sleeve, 0.3)
    if frac > 0:
        for x0, x1 in (LEFT_ARM, RIGHT_ARM):
            md.rectangle(c.box(x0 - 1, ARM_TOP - 1, x1 + 1, ARM_TOP + frac * (ARM_BOTTOM - ARM_TOP)), fill=255)
    # neckline cut-outs show skin
    if neckline == "v":
        md.polygon(c.pts([(57, 30), (71, 30), (64, 44)]), fill=0)
    elif neckline == "round":
        md.ellipse(c.box(57, 25, 71, 38), fill=0)
    elif neckline == "square":
        md.rectangle(c.box(57, 30, 71, 40), fill=0)
    c.fill(m, outfit.upper, rng)
    ink = (25, 25, 35)
    if neckline == "stand":
        c.draw.rectangle(c.box(58, 25, 70, 31), fill=ink)
    elif neckline == "lapel":
        c.draw.polygon(c.pts([(56, 31), (63, 31), (60, 46)]), fill=ink)
        c.draw.polygon(c.pts([(65, 31), (72, 31), (68, 46)]), fill=ink)


def _draw_accessories(c: _Canvas, outfit: Outfit, rng: np.random.Generator) -> None:
    d = c.draw
    if outfit.hat:
        hat = tuple(int(v) for v in rng.integers(0, 200, size=3))
        d.rectangle(c.box(50, 10, 78, 13), fill=hat)
        d.rectangle(c.box(56, 2, 72, 11), fill=hat)
    if outfit.glasses == "sunglasses":
        d.rectangle(c.box(56, 15, 72, 19), fill=(10, 10, 10))
    elif outfit.glasses == "eyeglasses":
        for x in (57, 65):
            d.ellipse(c.box(x, 14, x + 6, 19.5), outline=(10, 10, 10), width=max(1, int(c.scale)))
    elif outfit.glasses == "in_hand":
        d.rectangle(c.box(83, 82, 93, 86), fill=(10, 10, 10))
    if outfit.neckwear:
        d.rectangle(c.box(59, 27, 69, 33), fill=(200, 30, 40))
        d.rectangle(c.box(62, 33, 66, 45), fill=(200, 30, 40))
    if outfit.wrist:
        d.rectangle(c.box(37, 70, 48, 74), fill=(230, 190, 40))
    if outfit.ring:
        d.ellipse(c.box(87, 80, 91, 84), fill=(255, 215, 0))
    if outfit.waist == "belt":
        d.rectangle(c.box(47, 69, 81, 74), fill=(70, 40, 15))
        d.rectangle(c.box(61, 69, 67, 74), fill=(230, 200, 60))
    elif outfit.waist == "clothing":
        cloth = tuple(int(v) for v in rng.integers(60, 230, size=3))
        d.polygon(c.pts([(46, 67), (82, 67), (76, 84), (64, 76), (52, 84)]), fill=cloth)
