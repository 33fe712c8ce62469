"""What every way of running a trained student shares, without torch: reading its self-describing ``best/`` folder
(``student.json``), turning PIL images into the encoder's input, and captioning a list of images in batches.

A student's ``best/`` folder holds ``student.json`` (architecture, decoder hyper-parameters, encoder name and
settings, image transform, maximum length, default beam size, seed; after scoring also the caption source and the
test metrics), ``model.safetensors`` (decoder), ``encoder.safetensors`` (the encoder's weights, frozen or
fine-tuned), ``vocab.json`` and ``README.md`` (the model card); ``make export`` adds ``onnx/``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from pipeline.core.archs import ARCHS
from pipeline.core.errors import PipelineError

FORMAT_VERSION = 2  # 1: student.json without decoder/encoder/image settings (rebuilt from the run's config)
REQUIRED_KEYS = ("format_version", "arch", "feat_dim", "vocab_size", "decoder", "encoder", "image", "max_length",
                 "beam_size")


def read_student_json(folder: Path) -> dict:
    """``folder/student.json``, checked to describe a student in this format; else one line naming what is missing."""
    path = Path(folder) / "student.json"
    if not path.is_file():
        raise PipelineError(f"{path} not found: a student is the best/ folder the students stage writes "
                            "(runs/<run>/students/<arch>__<source>/best)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise PipelineError(f"{path}: written by an older version (no {', '.join(missing)}), so it cannot rebuild "
                            "itself without its config; retrain it with `make students ARGS=--force`")
    version = meta["format_version"]
    if not _is_int(version) or version < FORMAT_VERSION:
        raise PipelineError(f"{path}: format_version {version!r}: this code reads format {FORMAT_VERSION}; retrain "
                            "the student with `make students ARGS=--force`")
    if version > FORMAT_VERSION:
        raise PipelineError(f"{path}: format_version {version} is newer than this code reads "
                            f"({FORMAT_VERSION}); update fashion-distill")
    _check_values(path, meta)
    return meta


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_values(path: Path, meta: dict) -> None:
    """One line naming the first key of ``student.json`` whose value no student has (e.g. edited by hand)."""
    image = meta["image"] if isinstance(meta["image"], dict) else {}
    encoder = meta["encoder"] if isinstance(meta["encoder"], dict) else {}
    channels = [image.get("mean"), image.get("std")]
    arch = ARCHS.get(meta["arch"]) if isinstance(meta["arch"], str) else None
    checks = {
        "arch": arch is not None,
        "encoder.name": arch is not None and encoder.get("name") == arch.encoder,
        **{key: _is_int(meta[key]) and meta[key] > 0 for key in ("feat_dim", "vocab_size", "max_length",
                                                                 "beam_size")},
        "image.size": _is_int(image.get("size")) and image["size"] > 0,
        "image.mean": isinstance(channels[0], list) and len(channels[0]) == 3
        and all(isinstance(v, (int, float)) for v in channels[0]),
        "image.std": isinstance(channels[1], list) and len(channels[1]) == 3
        and all(isinstance(v, (int, float)) and v > 0 for v in channels[1]),
    }
    for key, ok in checks.items():
        if not ok:
            value = meta
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            raise PipelineError(f"{path}: {key}: {value!r} is not a valid value (a student written by this pipeline "
                                "has none such; was it edited?)")


def require_files(folder: Path, names: Sequence[str]) -> None:
    """One line naming the files of a student that ``folder`` lacks."""
    absent = [name for name in names if not (Path(folder) / name).is_file()]
    if absent:
        raise PipelineError(f"{folder}: incomplete student, {', '.join(absent)} missing")


def to_pixels(images: Sequence[Image.Image], *, size: int, mean: Sequence[float], std: Sequence[float]
              ) -> np.ndarray:
    """RGB images as the encoder's input [B, 3, size, size] float32: resized (bilinear), scaled to [0, 1] and
    normalised per channel, the steps and arithmetic of the training transform (torchvision Resize, ToTensor,
    Normalize)."""
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, image in enumerate(images):
        pixels = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1)
        out[i] = (pixels / np.float32(255) - m) / s
    return out


class Captioner(Protocol):
    """A student in one runtime (PyTorch or onnxruntime), or the teacher."""

    def caption(self, images: Sequence[Image.Image], beam_size: int) -> list[str]:
        """One caption per RGB image, in one batch."""
        ...


def until_end(row: list[int], end_id: int) -> list[int]:
    """A decoded token row up to (without) its first ``end_id``."""
    return row[: row.index(end_id)] if end_id in row else row


def repeated_ngram_bans(rows: Sequence[Sequence[int]], n: int) -> list[list[int]]:
    """Per token row, the tokens that would repeat one of its ``n``-grams if written next (n-gram blocking, as in
    fairseq's and transformers' ``no_repeat_ngram_size``); nothing for ``n`` < 1. Shared by the PyTorch and the
    onnxruntime decoders so that both block the same tokens."""
    if n < 1:
        return [[] for _ in rows]
    out = []
    for row in rows:
        row = list(row)
        prefix = tuple(row[len(row) - n + 1:]) if n > 1 else ()
        if len(row) < n:
            out.append([])
            continue
        out.append(sorted({row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i: i + n - 1]) == prefix}))
    return out


def caption_images(captioner: Captioner, images: Sequence[Image.Image], *, batch_size: int, beam_size: int
                   ) -> list[str]:
    """Captions of ``images`` (RGB), ``batch_size`` at a time: the unit to time a runtime with."""
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        out += captioner.caption(images[start: start + batch_size], beam_size)
    return out
