"""Parse a DeepFashion-MultiModal caption into the outfit attributes it states.

The captions were generated from attribute labels with templates (closed vocabulary of ~105 words), so a slot parser
recovers the labels: each sentence is scanned for garment mentions (upper, lower, outer) and attribute phrases; an
attribute phrase belongs to the closest garment mentioned before it in the sentence, or, when the sentence mentions
none ("The fabric is denim and it has ..."), to the garment the previous sentence ended on.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

UPPER_NOUN = r"tank tank shirt|tank top|tank shirt|t-shirt|shirt|sweater|upper clothing"
LOWER_NOUN = r"pants|trousers|shorts|skirt|leggings|lower clothing"
OUTER_NOUN = r"outer clothing"
FABRICS = ("denim", "cotton", "leather", "furry", "knitting", "chiffon", "mixed", "other")
PATTERNS = {
    "floral": "floral", "graphic": "graphic", "striped": "striped", "stripe": "striped", "solid color": "solid",
    "pure color": "solid", "lattice": "lattice", "plaid": "lattice", "color block": "color_block",
    "complicated": "mixed", "mixed": "mixed", "other": "mixed",
}
NECKLINES = {"v-shape": "v", "square": "square", "round": "round", "crew": "round", "stand": "stand",
             "lapel": "lapel", "suspenders": "suspenders"}
LOWER_LENGTHS = ("three-point", "three-quarter", "medium", "short", "long")
_PAT = "|".join(sorted(PATTERNS, key=len, reverse=True))
_FAB = "|".join(FABRICS)
_NECK = "|".join(NECKLINES)
_LEN = "|".join(LOWER_LENGTHS)

_GARMENT_RE = re.compile(rf"\b(?:(?P<upper>{UPPER_NOUN})|(?P<lower>{LOWER_NOUN})|(?P<outer>{OUTER_NOUN}))\b")
_RULES: list[tuple[str, re.Pattern[str]]] = [
    ("sleeve", re.compile(r"\b(?P<v>long|short|medium)(?: sleeves|-sleeve)\b")),
    ("sleeve", re.compile(r"\b(?P<v>no sleeves|sleeveless|sleeves cut off)\b")),
    ("length", re.compile(rf"\b(?P<v>{_LEN}) (?:{LOWER_NOUN})\b")),
    ("length", re.compile(rf"\b(?:is|are) of (?P<v>{_LEN}) length\b")),
    ("fabric", re.compile(rf"\b(?P<v>{_FAB}) fabric\b")),
    ("fabric", re.compile(rf"\bfabric is (?P<v>{_FAB})\b")),
    ("pattern", re.compile(rf"\b(?P<v>{_PAT}) patterns?\b")),
    ("pattern", re.compile(rf"\bpattern of it is (?P<v>{_PAT})\b")),
    ("neckline", re.compile(rf"\b(?P<v>{_NECK}) neckline\b")),
    ("neckline", re.compile(rf"\bneckline(?: of (?:it|the [\w-]+(?: [\w-]+)?))? is (?P<v>{_NECK})\b")),
    ("neckwear", re.compile(r"\bneckwear\b|\baccessory in (?:his |her )+neck\b")),
    ("wrist", re.compile(r"\baccessory on (?:his|her) wrist\b")),
    ("ring", re.compile(r"\bring\b")),
    ("hat", re.compile(r"\bhat\b")),
    ("glasses_in_hand", re.compile(r"\bglasses on (?:his|her) hands or clothes\b")),
    ("sunglasses", re.compile(r"\bsunglasses\b")),
    ("eyeglasses", re.compile(r"\bglasses\b")),
    ("belt", re.compile(r"\bbelt\b")),
    ("waist_clothing", re.compile(r"\bclothing on (?:his|her) waist\b")),
    ("socks", re.compile(r"\bsocks\b")),
]
_FEMALE = re.compile(r"\b(?:lady|woman|female|she|her)\b")
_MALE = re.compile(r"\b(?:man|gentleman|guy|he|his)\b")


@dataclass
class Garment:
    kind: str | None = None  # upper: tank/t-shirt/shirt/sweater; lower: pants/trousers/shorts/skirt/leggings
    fabric: str | None = None
    pattern: str | None = None


@dataclass
class Outfit:
    """Everything a DeepFashion-MultiModal caption can say about a photo."""

    gender: str | None = None  # "female" | "male"
    upper: Garment | None = None
    sleeve: str | None = None  # sleeveless | short | medium | long
    neckline: str | None = None  # v | square | round | stand | lapel | suspenders
    lower: Garment | None = None
    lower_length: str | None = None  # three-point | short | medium | three-quarter | long
    outer: Garment | None = None
    hat: bool = False
    glasses: str | None = None  # sunglasses | eyeglasses | in_hand
    neckwear: bool = False
    wrist: bool = False
    ring: bool = False
    waist: str | None = None  # belt | clothing
    socks: bool = False
    unparsed: list[str] = field(default_factory=list)  # sentences that yielded nothing

    @property
    def fully_parsed(self) -> bool:
        """Every sentence was read and every garment got its fabric and pattern (and the lower one its length)."""
        garments = [g for g in (self.upper, self.lower, self.outer) if g is not None]
        return (not self.unparsed and bool(garments) and all(g.fabric and g.pattern for g in garments)
                and (self.lower is None or self.lower_length is not None))

    def to_dict(self) -> dict:
        return asdict(self)


def _split_sentences(caption: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=\.)\s+", caption.strip().lower()) if s.strip(" .")]


def _garment(outfit: Outfit, slot: str) -> Garment:
    current = getattr(outfit, slot)
    if current is None:
        current = Garment()
        setattr(outfit, slot, current)
    return current


def _kind(slot: str, noun: str) -> str | None:
    if slot == "outer" or noun.endswith("clothing"):
        return None
    if slot == "upper":
        return "tank" if noun.startswith("tank") else noun
    return noun


def parse_caption(caption: str) -> Outfit:
    """Parse one caption; sentences the parser cannot read are kept in ``Outfit.unparsed``."""
    outfit = Outfit()
    text = caption.lower()
    if _FEMALE.search(text):
        outfit.gender = "female"
    elif _MALE.search(text):
        outfit.gender = "male"
    context: str | None = None
    for sentence in _split_sentences(caption):
        mentions = [(m.start(), m.lastgroup, m.group(m.lastgroup)) for m in _GARMENT_RE.finditer(sentence)]
        for _, slot, noun in mentions:
            garment = _garment(outfit, slot)
            garment.kind = garment.kind or _kind(slot, noun)
        found = 0
        claimed: list[tuple[int, int]] = []
        for name, rule in _RULES:
            for m in rule.finditer(sentence):
                if any(a <= m.start() < b for a, b in claimed):
                    continue  # e.g. "sunglasses" already read; don't read its "glasses" again
                claimed.append(m.span())
                found += _apply(outfit, name, m.groupdict().get("v"), m.start(), mentions, context)
        if mentions:
            context = mentions[-1][1]
        if not found and not mentions:
            outfit.unparsed.append(sentence)
        elif not found and mentions and not re.search(r"\b(wears|wearing)\b", sentence):
            outfit.unparsed.append(sentence)
    return outfit


def _owner(pos: int, mentions: list[tuple[int, str, str]], context: str | None) -> str | None:
    before = [slot for start, slot, _ in mentions if start <= pos]
    if before:
        return before[-1]
    if mentions:
        return mentions[0][1]
    return context


def _apply(outfit: Outfit, name: str, value: str | None, pos: int, mentions: list, context: str | None) -> int:
    if name == "sleeve":
        outfit.sleeve = "sleeveless" if value in ("no sleeves", "sleeveless", "sleeves cut off") else value
        _garment(outfit, "upper")
    elif name == "length":
        outfit.lower_length = value
        _garment(outfit, "lower")
    elif name == "neckline":
        outfit.neckline = NECKLINES[value]
        _garment(outfit, "upper")
    elif name in ("fabric", "pattern"):
        slot = _owner(pos, mentions, context)
        if slot is None:
            return 0
        setattr(_garment(outfit, slot), name, PATTERNS[value] if name == "pattern" else value)
    elif name in ("neckwear", "wrist", "ring", "hat", "socks"):
        setattr(outfit, name, True)
    elif name == "glasses_in_hand":
        outfit.glasses = "in_hand"
    elif name in ("sunglasses", "eyeglasses"):
        outfit.glasses = outfit.glasses or name
    elif name == "belt":
        outfit.waist = "belt"
    elif name == "waist_clothing":
        outfit.waist = outfit.waist or "clothing"
    return 1
