"""The one table of student architectures: every place that lists, builds, names or plots students reads it.

An architecture is an encoder family (a torchvision model), a decoder and the shape of the features the decoder
reads (``global``: one vector per image; ``grid``: a sequence of regions or tokens). Plain data, no torch: the config
validates ``students.archs`` against it when it loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class ArchSpec:
    name: str
    encoder: Literal["vgg19", "resnet101", "vit_b_16"]  # torchvision family
    decoder: Literal["gru", "attention_gru", "transformer"]
    features: Literal["global", "grid"]  # what the decoder reads: one vector, or a sequence of regions/tokens
    display: str  # the course project's name for it
    short: str  # a plot's tick label
    cpu_cost: float = 1.0  # relative CPU training time (a local scheduler starts the costly ones first)
    family: str = ""  # the encoder's family, for a scaled stand-in's name
    encoder_display: str = ""  # the part of ``display`` naming the full-size encoder


ARCHS: dict[str, ArchSpec] = {spec.name: spec for spec in (
    ArchSpec("vgg19_gru", "vgg19", "gru", "global", "VGG19 + GRU", "VGG19\nGRU", family="VGG",
             encoder_display="VGG19"),
    ArchSpec("resnet101_gru", "resnet101", "gru", "global", "ResNet-101 global + GRU", "R101\nGRU", family="ResNet",
             encoder_display="ResNet-101"),
    # the attention GRU runs a Python loop over the words: the costliest on a CPU
    ArchSpec("resnet101_attn_gru", "resnet101", "attention_gru", "grid", "ResNet-101 grid + attention GRU",
             "R101 grid\natt-GRU", cpu_cost=3.0, family="ResNet", encoder_display="ResNet-101"),
    ArchSpec("vit_transformer", "vit_b_16", "transformer", "grid", "ViT-B/16 + Transformer", "ViT-B/16\nTransf.",
             cpu_cost=2.0, family="ViT", encoder_display="ViT-B/16"),
)}
ENCODERS = tuple(dict.fromkeys(spec.encoder for spec in ARCHS.values()))


def arch_spec(name: str) -> ArchSpec:
    """The table's row for ``name``; a ValueError naming the known ones otherwise."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}")
    return ARCHS[name]


FULL_SIZE = 224  # the torchvision encoders' own input size


def is_stand_in(encoder: Mapping[str, Any]) -> bool:
    """Whether encoder settings (``students.encoder``: width, image_size, pretrained, stand_in) describe something
    other than the full-size torchvision encoder with its ImageNet weights at its own input size."""
    return (encoder.get("width", 1.0) != 1.0 or encoder.get("image_size", FULL_SIZE) != FULL_SIZE
            or bool(encoder.get("stand_in")) or not encoder.get("pretrained", True))


def display_name(arch: str, encoder: Mapping[str, Any] | None = None) -> str:
    """The name a table shows for ``arch`` (the name itself for one the table does not know); with the student's
    ``encoder`` settings, what ran: "ResNet-family stand-in (width 0.25, 96 px) global + GRU" for a scaled or
    stand-in encoder."""
    if arch not in ARCHS:
        return arch
    spec = ARCHS[arch]
    if encoder is None or not is_stand_in(encoder):
        return spec.display
    weights = "" if encoder.get("pretrained", True) else ", random weights"
    ran = (f"{spec.family}-family stand-in (width {encoder.get('width', 1.0):g}, "
           f"{encoder.get('image_size', FULL_SIZE)} px{weights})")
    return spec.display.replace(spec.encoder_display, ran, 1)


def short_name(arch: str) -> str:
    """A plot's label for ``arch``."""
    return ARCHS[arch].short if arch in ARCHS else arch
