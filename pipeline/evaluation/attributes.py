"""Attribute-level caption evaluation: does a caption state the right outfit for *this* image?

Every caption (reference or hypothesis) is parsed back into the DeepFashion-MultiModal labels it states
(:func:`pipeline.data.attributes.parse_caption`); per attribute, a hypothesis is right on an image when it states the
same value as the reference, "absent" included (a reference that does not mention a hat means "no hat": a hypothesis
that states one is wrong). Accuracy is over test images; the macro mean weighs every attribute equally.

Which caption words are labels. Checked on the 12,693 real captions (course split) against the garment category
in each image's file name (``WOMEN-Skirts-...``) and against other photos of the same garment id:
- upper nouns (tank top / t-shirt / shirt / sweater / upper clothing) are synonyms picked from the sleeve label:
  "tank" only with sleeveless or no sleeve stated (4,772 captions), "t-shirt" only with short (1,077), "sweater"
  only with long (1,853), "shirt" with long/short/medium; for a given sleeve value every noun has the same category
  distribution. So the noun is not scored; it counts as the sleeve it implies when no sleeve is stated;
- lower nouns pants / trousers / shorts / leggings rotate freely (1,974 garment ids are described with two or more of
  them across their photos, same category distribution), but "skirt" appears on 381 captions, 100% of them from the
  Skirts category: a skirt is a label (the dataset's parsing class), so ``lower_kind`` is skirt vs. other.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Mapping

from pipeline.data.attributes import Outfit, parse_caption

ABSENT = "absent"
# name -> human-readable label; order = table and heat-map column order
ATTRIBUTES = {
    "gender": "gender", "sleeve": "sleeve length", "neckline": "neckline", "upper_fabric": "upper fabric",
    "upper_pattern": "upper pattern", "lower_kind": "lower kind", "lower_length": "lower length",
    "lower_fabric": "lower fabric", "lower_pattern": "lower pattern", "outer": "outer clothing",
    "outer_fabric": "outer fabric", "outer_pattern": "outer pattern", "hat": "hat", "glasses": "glasses",
    "neckwear": "neckwear", "wrist": "wrist accessory", "ring": "ring", "waist": "waist accessory", "socks": "socks",
}
SLEEVE_OF_NOUN = {"tank": "sleeveless", "t-shirt": "short", "sweater": "long"}
_FABRICS = ("cotton", "denim", "leather", "furry", "knitting", "chiffon", "mixed", "other")
_PATTERNS = ("solid", "floral", "graphic", "striped", "lattice", "color_block", "mixed")
# every value an attribute can take (ABSENT first): the classes of the pretraining stand-ins' attribute heads
ATTRIBUTE_VALUES = {
    "gender": ("female", "male"), "sleeve": ("sleeveless", "short", "medium", "long"),
    "neckline": ("v", "square", "round", "stand", "lapel", "suspenders"), "upper_fabric": _FABRICS,
    "upper_pattern": _PATTERNS, "lower_kind": ("skirt", "other"),
    "lower_length": ("three-point", "short", "medium", "three-quarter", "long"), "lower_fabric": _FABRICS,
    "lower_pattern": _PATTERNS, "outer": ("yes",), "outer_fabric": _FABRICS, "outer_pattern": _PATTERNS,
    "hat": ("yes",), "glasses": ("sunglasses", "eyeglasses", "in_hand"), "neckwear": ("yes",), "wrist": ("yes",),
    "ring": ("yes",), "waist": ("belt", "clothing"), "socks": ("yes",),
}
ATTRIBUTE_VALUES = {a: (ABSENT, *values) for a, values in ATTRIBUTE_VALUES.items()}


def outfit_labels(outfit: Outfit) -> dict[str, str]:
    """The scored label values an outfit states (``ABSENT`` where it states none)."""
    upper, lower, outer = outfit.upper, outfit.lower, outfit.outer
    sleeve = outfit.sleeve or (SLEEVE_OF_NOUN.get(upper.kind) if upper else None)
    values = {
        "gender": outfit.gender, "sleeve": sleeve, "neckline": outfit.neckline,
        "upper_fabric": upper and upper.fabric, "upper_pattern": upper and upper.pattern,
        "lower_kind": lower and ("skirt" if lower.kind == "skirt" else "other"),
        "lower_length": outfit.lower_length, "lower_fabric": lower and lower.fabric,
        "lower_pattern": lower and lower.pattern, "outer": outer and "yes",
        "outer_fabric": outer and outer.fabric, "outer_pattern": outer and outer.pattern,
        "hat": outfit.hat and "yes", "glasses": outfit.glasses, "neckwear": outfit.neckwear and "yes",
        "wrist": outfit.wrist and "yes", "ring": outfit.ring and "yes", "waist": outfit.waist,
        "socks": outfit.socks and "yes",
    }
    return {name: values[name] or ABSENT for name in ATTRIBUTES}


@functools.lru_cache(maxsize=1 << 16)
def _labels(caption: str) -> tuple[str, ...]:
    return tuple(outfit_labels(parse_caption(caption)).values())


def caption_labels(caption: str) -> dict[str, str]:
    """The scored labels ``caption`` states. Parsed once per distinct caption: the same test references are scored
    against every model, its image-withheld control and the baselines."""
    return dict(zip(ATTRIBUTES, _labels(caption)))


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def _summary(per_attribute: dict[str, float], images: int) -> dict:
    return {"macro": _mean(per_attribute.values()), "per_attribute": per_attribute, "images": images}


def attribute_accuracy(references: Mapping[str, str], hypotheses: Mapping[str, str]) -> dict:
    """Per-attribute accuracy of ``hypotheses`` against ``references`` (image id -> caption, same ids) and their
    macro mean: ``{"macro", "per_attribute", "images"}``."""
    if set(references) != set(hypotheses):
        differ = sorted(set(references) ^ set(hypotheses))[:5]
        raise ValueError(f"references and hypotheses differ in ids, e.g. {differ}")
    if not references:
        raise ValueError("nothing to score")
    ref = {k: caption_labels(v) for k, v in references.items()}
    hyp = {k: caption_labels(v) for k, v in hypotheses.items()}
    return _summary({a: _mean(ref[k][a] == hyp[k][a] for k in ref) for a in ATTRIBUTES}, len(ref))


def attribute_agreement(reference: str, hypothesis: str) -> float:
    """The share of the scored attributes on which ``hypothesis`` states what ``reference`` states (an attribute
    neither states counts as agreement, as in :func:`attribute_accuracy`)."""
    ref, hyp = _labels(reference), _labels(hypothesis)
    return sum(r == h for r, h in zip(ref, hyp)) / len(ref)


def per_image_attributes(references: Mapping[str, str], hypotheses: Mapping[str, str]) -> dict[str, float]:
    """Each image's :func:`attribute_agreement`: their mean is :func:`attribute_accuracy`'s macro accuracy."""
    if set(references) != set(hypotheses):
        differ = sorted(set(references) ^ set(hypotheses))[:5]
        raise ValueError(f"references and hypotheses differ in ids, e.g. {differ}")
    return {k: attribute_agreement(v, hypotheses[k]) for k, v in references.items()}


def majority_values(train_captions: Iterable[str]) -> dict[str, str]:
    """The most frequent value of every attribute over ``train_captions`` (ties: the alphabetically first)."""
    counts: dict[str, Counter] = {a: Counter() for a in ATTRIBUTES}
    n = 0
    for caption in train_captions:
        n += 1
        for a, v in caption_labels(caption).items():
            counts[a][v] += 1
    if not n:
        raise ValueError("no training captions to take the majority from")
    return {a: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for a, c in counts.items()}


def majority_baseline(train_captions: Iterable[str], references: Mapping[str, str]) -> dict:
    """Accuracy of always answering each attribute's most frequent training value, on ``references``; the values
    are in ``"values"``."""
    values = majority_values(train_captions)
    ref = [caption_labels(c) for c in references.values()]
    if not ref:
        raise ValueError("nothing to score")
    return {**_summary({a: _mean(r[a] == values[a] for r in ref) for a in ATTRIBUTES}, len(ref)), "values": values}


def caption_marks(reference: str, hypothesis: str) -> list[dict[str, str]]:
    """What ``hypothesis`` gets right and wrong about the reference outfit, attribute by attribute: one entry per
    attribute either caption states, ``status`` "right", "wrong" (states another value, or one the reference lacks)
    or "missed" (the reference states it, the hypothesis does not)."""
    ref, hyp = caption_labels(reference), caption_labels(hypothesis)
    marks = []
    for a, label in ATTRIBUTES.items():
        if ref[a] == ABSENT and hyp[a] == ABSENT:
            continue
        status = "right" if ref[a] == hyp[a] else "missed" if hyp[a] == ABSENT else "wrong"
        marks.append({"attribute": a, "label": label, "stated": hyp[a], "expected": ref[a], "status": status})
    return marks
