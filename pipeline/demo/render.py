"""Render a fashion photo stand-in from parsed caption attributes, so every stated attribute is visible.

A front-facing figure on a 128-unit canvas: garment shapes are masks filled with a fabric texture (denim twill, knit
ribs, fur speckle, dark leather with sheen, pale chiffon, ...) and a pattern overlay (stripes, lattice, flowers, big
graphic prints where the garment shows, colour blocks). Sleeve and leg lengths, the neckline (a deep V, a wide round
scoop or a square cut, each inside a dark trim; dark straps; a stand collar; lapels), the outer layer and accessories
(hat, glasses, neckwear, bracelet, ring, belt or waist cloth, socks) are drawn where they sit, large enough to tell
apart at 64 px. Colours that captions do not state are random per image; everything a caption states is drawn
deterministically from it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.attributes import Garment, Outfit

# in the folders' settings: a change regenerates rendered datasets (and so everything trained on them)
# 2: outlined, larger neckline cuts drawn over any outer layer; larger prints where each garment shows; socks over hems
RENDERER_VERSION = 2
UNIT = 128  # drawing coordinates; the image is rendered at 2x its final size and downsampled
SLEEVE_FRACTION = {"sleeveless": 0.0, "short": 0.3, "medium": 0.6, "long": 1.0, None: 0.3}
# share of the legs below the hip band that the lower garment covers
LOWER_FRACTION = {"three-point": 0.12, "short": 0.32, "medium": 0.55, "three-quarter": 0.74, "long": 1.0, None: 0.55}
HIP_BOTTOM = 84  # every lower garment covers the hips down to here, so its fabric and pattern always show
# the skin-coloured cut of each neckline that has one: a deep V, a wide round scoop, a square
NECKLINE_CUTS = {"v": ("polygon", [(51, 30), (77, 30), (64, 58)]), "round": ("ellipse", (51, 16, 77, 47)),
                 "square": ("rectangle", (53, 30, 75, 48))}
SKIN_TONES = [(241, 194, 167), (224, 172, 138), (198, 134, 100), (141, 85, 58), (255, 219, 190)]
TORSO = (48, 32, 80, 72)
ARM_TOP, ARM_BOTTOM = 34, 76
LEG_TOP, LEG_BOTTOM = 72, 118
LEFT_ARM, RIGHT_ARM = (38, 47), (81, 90)
LEFT_LEG, RIGHT_LEG = (50, 63), (65, 78)
INK = (25, 25, 35)
# where a garment's graphic prints go (unit coordinates): on the chest, on the hip band every lower garment covers,
# on both open fronts of an outer layer (clear of the V's point, the belt and the top's hem)
PRINTS = {"upper": ((64, 61, 8),), "lower": ((64, 80, 5),), "outer": ((51, 52, 5), (77, 52, 5))}


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
    return (250, 250, 245) if lum < 120 else INK


def _texture(size: int, garment: Garment, prints: tuple, rng: np.random.Generator) -> Image.Image:
    """Full-canvas RGB fill for one garment: fabric texture, then pattern overlay. Textures are coarse (periods of
    6+ units, i.e. 3+ pixels at 64 px) so they survive the demo's low resolutions."""
    base = _colour(rng, garment.fabric)
    arr = np.empty((size, size, 3), np.float32)
    arr[:] = base
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) * (UNIT / size)
    fabric = garment.fabric
    if fabric == "denim":  # diagonal twill
        arr *= (1.0 - 0.3 * (((xx + yy) // 4) % 2))[..., None]
    elif fabric == "knitting":  # vertical ribs
        arr *= (1.0 - 0.4 * ((xx // 4) % 2))[..., None]
    elif fabric == "furry":  # coarse fuzz
        fuzz = rng.normal(0, 45, size=(size // 4 + 1, size // 4 + 1, 1)).repeat(4, 0).repeat(4, 1)[:size, :size]
        arr += fuzz
    elif fabric == "leather":  # dark with broad sheen bands
        arr += (70 * np.exp(-((xx - yy * 0.3 - 40) % 40 - 20) ** 2 / 40))[..., None]
    elif fabric in ("mixed", "other"):  # coarse checks
        arr *= (1.0 - 0.35 * ((yy // 8 + xx // 8) % 2))[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    _pattern(img, garment.pattern, base, prints, rng)
    return img


def _pattern(img: Image.Image, pattern: str | None, base: tuple[int, int, int], prints: tuple,
             rng: np.random.Generator) -> None:
    draw = ImageDraw.Draw(img)
    s = img.size[0] / UNIT
    ink = _contrast(base)
    if pattern == "striped":  # horizontal bands
        for y in range(0, UNIT, 8):
            draw.rectangle([0, y * s, img.size[0], (y + 4) * s], fill=ink)
    elif pattern == "lattice":  # a grid of lines both ways
        for v in range(0, UNIT, 9):
            draw.rectangle([v * s, 0, (v + 2.5) * s, img.size[1]], fill=ink)
            draw.rectangle([0, v * s, img.size[0], (v + 2.5) * s], fill=ink)
    elif pattern == "floral":  # scattered round blossoms
        petal = tuple(int(c) for c in rng.integers(150, 256, size=3))
        for _ in range(110):
            x, y = rng.uniform(0, UNIT, size=2)
            draw.ellipse([(x - 4.5) * s, (y - 4.5) * s, (x + 4.5) * s, (y + 4.5) * s], fill=petal)
            draw.ellipse([(x - 2) * s, (y - 2) * s, (x + 2) * s, (y + 2) * s], fill=ink)
    elif pattern == "graphic":  # big prints where the garment shows (``prints``: centre x, centre y, half size)
        for cx, cy, r in prints:
            shape = int(rng.integers(3))
            box = [(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s]
            if shape == 0:
                draw.ellipse(box, fill=ink)
            elif shape == 1:
                draw.rectangle(box, fill=ink)
            else:
                draw.polygon([(cx * s, (cy - r) * s), ((cx - r) * s, (cy + r) * s), ((cx + r) * s, (cy + r) * s)],
                             fill=ink)
    elif pattern == "color_block":  # the garment's right half in a second colour
        other = tuple(int(c) for c in rng.integers(30, 230, size=3))
        draw.rectangle([64 * s, 0, img.size[0], img.size[1]], fill=ink if sum(other) < 60 else other)
    elif pattern == "mixed":  # many small multicoloured shards
        for _ in range(200):
            cx, cy = rng.uniform(0, UNIT, size=2)
            pts = [((cx + dx) * s, (cy + dy) * s) for dx, dy in rng.uniform(-7, 7, size=(3, 2))]
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

    def fill(self, mask: Image.Image, garment: Garment, part: str, rng: np.random.Generator) -> None:
        self.image.paste(_texture(self.size, garment, PRINTS[part], rng), (0, 0), mask)


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
    if gender == "female":  # long hair down to the shoulders
        d.ellipse(c.box(50, 5, 78, 30), fill=hair)
        d.rectangle(c.box(50, 17, 78, 44), fill=hair)
    d.ellipse(c.box(55, 9, 73, 27), fill=skin)
    if gender == "male":  # short cropped hair and a beard line
        d.chord(c.box(55, 7, 73, 21), 180, 360, fill=hair)
        d.rectangle(c.box(58, 23, 70, 26), fill=hair)
    d.rectangle(c.box(61, 26, 67, 33), fill=skin)
    for x0, x1 in (LEFT_ARM, RIGHT_ARM):
        d.rectangle(c.box(x0, ARM_TOP, x1, ARM_BOTTOM), fill=skin)
        d.ellipse(c.box(x0 - 0.5, ARM_BOTTOM - 2, x1 + 0.5, ARM_BOTTOM + 7), fill=skin)
    d.rectangle(c.box(*TORSO), fill=skin)
    for x0, x1 in (LEFT_LEG, RIGHT_LEG):
        d.rectangle(c.box(x0, LEG_TOP, x1, LEG_BOTTOM), fill=skin)
        d.rectangle(c.box(x0 - 1, LEG_BOTTOM, x1 + 2, LEG_BOTTOM + 5), fill=(35, 30, 30))

    if outfit.lower is not None:
        _draw_lower(c, outfit, rng)
    if outfit.socks:  # above the shoes, over the hem of long trousers too (below a three-quarter hem)
        sock = tuple(int(v) for v in rng.integers(180, 256, size=3))
        for x0, x1 in (LEFT_LEG, RIGHT_LEG):
            d.rectangle(c.box(x0 - 1, LEG_BOTTOM - 5, x1 + 1, LEG_BOTTOM), fill=sock)
            d.rectangle(c.box(x0 - 1, LEG_BOTTOM - 5, x1 + 1, LEG_BOTTOM - 3.5), fill=INK)
    if outfit.upper is not None:
        _draw_upper(c, outfit, rng)
    if outfit.outer is not None:
        m, md = c.mask()
        md.rectangle(c.box(46, 31, 57, 76), fill=255)
        md.rectangle(c.box(71, 31, 82, 76), fill=255)
        for x0, x1 in (LEFT_ARM, RIGHT_ARM):
            md.rectangle(c.box(x0 - 1, ARM_TOP - 1, x1 + 1, ARM_BOTTOM - 1), fill=255)
        c.fill(m, outfit.outer, "outer", rng)
        d.line(c.pts([(57, 31), (57, 76)]), fill=(20, 20, 20), width=max(1, int(c.scale)))
        d.line(c.pts([(71, 31), (71, 76)]), fill=(20, 20, 20), width=max(1, int(c.scale)))
    if outfit.upper is not None:  # over an open outer layer too, so that it shows
        _draw_neckline(c, outfit.neckline)

    _draw_accessories(c, outfit, rng)
    return c.image.resize((size, size), Image.LANCZOS)


def _draw_lower(c: _Canvas, outfit: Outfit, rng: np.random.Generator) -> None:
    frac = LOWER_FRACTION.get(outfit.lower_length, 0.55)
    bottom = HIP_BOTTOM + frac * (LEG_BOTTOM - HIP_BOTTOM)
    m, md = c.mask()
    if outfit.lower.kind == "skirt":
        flare = 4 + 10 * frac
        md.polygon(c.pts([(49, LEG_TOP - 2), (79, LEG_TOP - 2), (79 + flare, bottom), (49 - flare, bottom)]), fill=255)
    else:
        md.rectangle(c.box(48, LEG_TOP - 2, 80, HIP_BOTTOM), fill=255)
        for x0, x1 in (LEFT_LEG, RIGHT_LEG):
            md.rectangle(c.box(x0 - 1, LEG_TOP, x1 + 1, bottom), fill=255)
    c.fill(m, outfit.lower, "lower", rng)


def _draw_upper(c: _Canvas, outfit: Outfit, rng: np.random.Generator) -> None:
    neckline = outfit.neckline
    sleeve = outfit.sleeve or ("sleeveless" if outfit.upper.kind == "tank" else None)
    m, md = c.mask()
    top = 50 if neckline == "suspenders" else 31
    md.rectangle(c.box(47, top, 81, 74), fill=255)
    frac = SLEEVE_FRACTION.get(sleeve, 0.3)
    if frac > 0:
        for x0, x1 in (LEFT_ARM, RIGHT_ARM):
            md.rectangle(c.box(x0 - 1, ARM_TOP - 1, x1 + 1, ARM_TOP + frac * (ARM_BOTTOM - ARM_TOP)), fill=255)
    # neckline cuts show skin inside a dark trim (the trim keeps the shape visible on skin-coloured fabric)
    kind, points = NECKLINE_CUTS.get(neckline, (None, None))
    if kind == "polygon":
        md.polygon(c.pts(points), fill=0)
    elif kind == "ellipse":
        md.ellipse(c.box(*points), fill=0)
    elif kind == "rectangle":
        md.rectangle(c.box(*points), fill=0)
    c.fill(m, outfit.upper, "upper", rng)


def _draw_neckline(c: _Canvas, neckline: str | None) -> None:
    """The dark trim round a neckline's cut, the straps of suspenders, a stand collar or lapels."""
    width = max(1, round(2.5 * c.scale))
    kind, points = NECKLINE_CUTS.get(neckline, (None, None))
    if kind == "polygon":  # every edge but the top one
        c.draw.line(c.pts(points[1:] + points[:1]), fill=INK, width=width)
    elif kind == "ellipse":  # the lower half
        c.draw.arc(c.box(*points), 0, 180, fill=INK, width=width)
    elif kind == "rectangle":  # both sides and the bottom
        x0, y0, x1, y1 = points
        c.draw.line(c.pts([(x0, y0), (x0, y1), (x1, y1), (x1, y0)]), fill=INK, width=width)
    if neckline == "suspenders":  # two broad dark straps over bare shoulders
        for x0 in (51, 71):
            c.draw.rectangle(c.box(x0, 31, x0 + 6, 51), fill=INK)
    elif neckline == "stand":
        c.draw.rectangle(c.box(55, 24, 73, 34), fill=INK)
    elif neckline == "lapel":
        c.draw.polygon(c.pts([(52, 31), (63, 31), (58, 54)]), fill=INK)
        c.draw.polygon(c.pts([(65, 31), (76, 31), (70, 54)]), fill=INK)


def _draw_accessories(c: _Canvas, outfit: Outfit, rng: np.random.Generator) -> None:
    d = c.draw
    if outfit.hat:  # a wide-brimmed hat
        hat = tuple(int(v) for v in rng.integers(0, 160, size=3))
        d.rectangle(c.box(46, 9, 82, 14), fill=hat)
        d.rectangle(c.box(54, 0, 74, 11), fill=hat)
    if outfit.glasses == "sunglasses":
        d.rectangle(c.box(55, 14, 73, 20), fill=(10, 10, 10))
    elif outfit.glasses == "eyeglasses":
        for x in (55, 65):
            d.ellipse(c.box(x, 13, x + 8, 20), outline=(10, 10, 10), width=max(1, int(1.5 * c.scale)))
    elif outfit.glasses == "in_hand":
        d.rectangle(c.box(82, 80, 96, 87), fill=(10, 10, 10))
    if outfit.neckwear:  # a red scarf round the neck, its end hanging at the side (the neckline stays visible)
        d.rectangle(c.box(58, 25, 70, 30), fill=(200, 30, 40))
        d.rectangle(c.box(45, 27, 58, 31), fill=(200, 30, 40))
        d.rectangle(c.box(44, 27, 49, 52), fill=(200, 30, 40))
    if outfit.wrist:  # bracelets on both wrists
        for x0, x1 in (LEFT_ARM, RIGHT_ARM):
            d.rectangle(c.box(x0 - 2, 66, x1 + 2, 73), fill=(240, 200, 30))
    if outfit.ring:  # a large ring on the left hand
        d.ellipse(c.box(37, 77, 48, 87), fill=(120, 0, 200))
        d.ellipse(c.box(40, 80, 45, 84), fill=(250, 250, 250))
    if outfit.waist == "belt":
        d.rectangle(c.box(46, 68, 82, 75), fill=(70, 40, 15))
        d.rectangle(c.box(60, 68, 68, 75), fill=(230, 200, 60))
    elif outfit.waist == "clothing":  # a cloth tied round the waist
        cloth = tuple(int(v) for v in rng.integers(60, 230, size=3))
        d.polygon(c.pts([(44, 66), (84, 66), (78, 88), (64, 78), (50, 88)]), fill=cloth)
