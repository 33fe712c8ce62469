import itertools

import numpy as np
import pytest

from pipeline.data.attributes import parse_caption
from pipeline.demo.render import render_outfit
from pipeline.demo.synthetic import load_caption_pool


def test_parses_every_real_caption_fully():
    pool = load_caption_pool()
    captions = [c for split in pool.values() for c in split.values()]
    assert len(captions) == 12693
    full = sum(parse_caption(c).fully_parsed for c in captions)
    assert full / len(captions) >= 0.999, f"fully parsed {full}/{len(captions)}"


def test_parse_examples():
    o = parse_caption("The lady is wearing a long-sleeve sweater with plaid patterns and a three-point skirt. "
                      "The sweater is with knitting fabric and its neckline is lapel. The skirt is with denim "
                      "fabric and floral patterns. There is a hat in her head. This lady wears a pair of sunglasses. "
                      "There is an accessory on her wrist. There is a belt on her waist. This lady wears socks in "
                      "shoes.")
    assert o.gender == "female" and o.sleeve == "long" and o.neckline == "lapel"
    assert (o.upper.kind, o.upper.fabric, o.upper.pattern) == ("sweater", "knitting", "lattice")
    assert (o.lower.kind, o.lower.fabric, o.lower.pattern, o.lower_length) == ("skirt", "denim", "floral",
                                                                               "three-point")
    assert o.hat and o.glasses == "sunglasses" and o.wrist and o.waist == "belt" and o.socks
    assert not o.ring and not o.neckwear and o.outer is None and o.fully_parsed


def test_context_sentence_attaches_to_previous_garment():
    o = parse_caption("The upper clothing has short sleeves, cotton fabric and solid color patterns. The lower "
                      "clothing is of long length. The fabric is denim and it has striped patterns. This man also "
                      "wears an outer clothing, with leather fabric and complicated patterns.")
    assert o.gender == "male" and o.upper.fabric == "cotton"
    assert (o.lower.fabric, o.lower.pattern, o.lower_length) == ("denim", "striped", "long")
    assert (o.outer.fabric, o.outer.pattern) == ("leather", "mixed")


def test_unreadable_sentence_is_reported():
    o = parse_caption("The upper clothing has long sleeves, cotton fabric and solid color patterns. "
                      "It glows in the dark.")
    assert o.unparsed == ["it glows in the dark."] and not o.fully_parsed


BASE = ("Her t-shirt has {sleeve} sleeves, cotton fabric and solid color patterns. The woman wears a long pants. "
        "The pants are with denim fabric and solid color patterns.{extra}")


def _pixels(caption: str, seed: int = 3) -> np.ndarray:
    return np.asarray(render_outfit(parse_caption(caption), 128, seed), dtype=np.int16)


def test_render_is_deterministic_for_a_seed():
    cap = BASE.format(sleeve="long", extra="")
    assert np.array_equal(_pixels(cap, 1), _pixels(cap, 1))
    assert not np.array_equal(_pixels(cap, 1), _pixels(cap, 2))


@pytest.mark.parametrize("extra, box", [
    (" There is a hat in her head.", (2, 50, 13, 78)),
    (" There is a belt on her waist.", (69, 47, 74, 81)),
    (" There is an accessory on her wrist.", (70, 37, 74, 48)),
    (" This lady wears a pair of sunglasses.", (15, 56, 19, 72)),
])
def test_stated_accessories_are_visible(extra, box):
    y0, x0, y1, x1 = box
    plain, dressed = _pixels(BASE.format(sleeve="short", extra="")), _pixels(BASE.format(sleeve="short", extra=extra))
    diff = np.abs(plain - dressed)[y0:y1, x0:x1].mean()
    assert diff > 20, f"{extra!r} barely changes its region (mean abs diff {diff:.1f})"


def test_sleeve_length_is_visible():
    lower_arm = (slice(62, 74), slice(38, 47))  # long sleeves cover it, short ones leave skin
    long_, short = _pixels(BASE.format(sleeve="long", extra="")), _pixels(BASE.format(sleeve="short", extra=""))
    assert np.abs(long_ - short)[lower_arm].mean() > 20


NECK = ("Her tank top has sleeves cut off, cotton fabric and solid color patterns.{neck} The woman wears a long pants. "
        "The pants are with denim fabric and solid color patterns.{extra}")
NECKLINES = {"absent": "", "v": " It has a v-shape neckline.", "round": " It has a round neckline.",
             "square": " It has a square neckline.", "suspenders": " It has a suspenders neckline.",
             "stand": " It has a stand neckline.", "lapel": " It has a lapel neckline."}


OUTER = " The lady also wears an outer clothing, with cotton fabric and solid color patterns."


@pytest.mark.parametrize("extra", ["", OUTER])
def test_every_neckline_is_drawn_differently_at_the_demo_resolution(extra):
    """At 64 px (the tiny LLaVA's input) each pair of necklines differs clearly in the neck and chest region, under an
    open outer layer too."""
    chest = (slice(14, 30), slice(24, 40))
    drawn = {}
    for name, sentence in NECKLINES.items():
        outfit = parse_caption(NECK.format(neck=sentence, extra=extra))
        assert (outfit.neckline or "absent") == name and (outfit.outer is not None) == bool(extra), sentence
        drawn[name] = np.asarray(render_outfit(outfit, 64, 3), dtype=np.int16)[chest]
    for (a, pixels_a), (b, pixels_b) in itertools.combinations(drawn.items(), 2):
        assert np.abs(pixels_a - pixels_b).mean() > 8, (a, b)


def test_socks_show_over_long_trousers_and_leave_a_three_quarter_hem_visible():
    ankles = (slice(110, 118), slice(38, 90))
    socks = " This lady wears socks in shoes."
    plain, with_socks = _pixels(NECK.format(neck="", extra="")), _pixels(NECK.format(neck="", extra=socks))
    assert np.abs(plain - with_socks)[ankles].mean() > 20
    three_quarter = NECK.format(neck="", extra=socks).replace("a long pants", "a three-quarter pants")
    assert parse_caption(three_quarter).lower_length == "three-quarter"
    shins = (slice(100, 118), slice(38, 90))
    assert np.abs(with_socks - _pixels(three_quarter))[shins].mean() > 10


@pytest.mark.parametrize("garment, caption, region", [
    ("upper", ("Her tank top has sleeves cut off, cotton fabric and {p} patterns. It has a v-shape neckline. The "
               "woman wears a long pants. The pants are with denim fabric and solid color patterns. There is a belt "
               "on her waist."), (slice(27, 34), slice(29, 35))),
    ("lower", ("Her tank top has sleeves cut off, cotton fabric and solid color patterns. The woman wears a long "
               "pants. The pants are with denim fabric and {p} patterns. There is a belt on her waist."),
     (slice(38, 42), slice(29, 35))),
])
def test_a_graphic_print_shows_on_its_garment_at_the_demo_resolution(garment, caption, region):
    """At 64 px a graphic print is visible where the garment always shows (past a V's point and a belt)."""
    solid, graphic = (np.asarray(render_outfit(parse_caption(caption.format(p=p)), 64, 3), dtype=np.int16)[region]
                      for p in ("solid color", "graphic"))
    assert getattr(parse_caption(caption.format(p="graphic")), garment).pattern == "graphic"
    assert np.abs(solid - graphic).mean() > 30, garment
