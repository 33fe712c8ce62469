"""Captioning a user's own image files (``make caption``) with a student, in PyTorch or onnxruntime, or with the
run's fine-tuned teacher.

Images are named by files, folders (every file below them) or glob patterns. Each one is read upright and as 8-bit
RGB whatever its mode (:func:`pipeline.data.images.load_rgb`); one larger than ``max_pixels`` is refused from its
header, before its pixels are decoded. Unreadable and non-image files are skipped with their reason. The output is
one JSON line per captioned image: its path, the caption and the attributes the caption states. Nothing here
imports torch unless the captioner needs it: the ONNX path runs on onnxruntime and numpy alone.
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from PIL import Image
from tqdm import tqdm

from pipeline.core.errors import PipelineError
from pipeline.core.rundir import atomic_write_text
from pipeline.data.images import ImageError, load_rgb, not_a_file
from pipeline.evaluation.attributes import ABSENT, caption_labels
from pipeline.students.runtime import Captioner, read_student_json

if TYPE_CHECKING:
    from pipeline.core.config import Config
    from pipeline.teacher.engines import EngineCaptioner

log = logging.getLogger(__name__)
Runtime = Literal["torch", "onnx"]


class UnusableImage(Exception):
    """A file that cannot be captioned; the message is the reason."""


@dataclass
class CaptionResult:
    captioned: int
    skipped: list[dict[str, str]]  # {"path", "reason"}
    out: Path
    skipped_file: Path


def find_images(patterns: Sequence[str]) -> list[Path]:
    """The files ``patterns`` name, in order and once each: a file, a folder (every file below it, sorted) or a glob
    pattern (``**`` recurses)."""
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if not p.is_dir())  # FIFOs, links: skipped with a reason
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file())
            if not matches:
                raise PipelineError(f"IMAGES {pattern}: no such file or folder, and no file matches it as a pattern")
            found += matches
    return list(dict.fromkeys(found))


def read_image(path: Path, *, max_pixels: int) -> Image.Image:
    """The image at ``path`` as upright 8-bit RGB; :class:`UnusableImage` when it is not a readable image or has more
    than ``max_pixels`` pixels (checked from the header, before decoding)."""
    if (reason := not_a_file(path)) is not None:
        raise UnusableImage(reason)
    try:
        with Image.open(path) as im:
            width, height = im.size
    except Image.DecompressionBombError as exc:
        raise UnusableImage(f"too large: {exc}") from None
    except Image.UnidentifiedImageError:
        raise UnusableImage("not an image (no image format PIL reads)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for a header it cannot parse
        raise UnusableImage(f"not a readable image ({type(exc).__name__}: {exc})") from None
    if width * height > max_pixels:
        raise UnusableImage(f"too large: {width}x{height} = {width * height} pixels, more than "
                            f"caption.max_pixels={max_pixels}")
    try:
        return load_rgb(path)
    except ImageError as exc:
        raise UnusableImage(str(exc).removeprefix(f"{path}: ")) from None


def stated_attributes(caption: str) -> dict[str, str]:
    """The attributes (DeepFashion labels) a caption states, with their values."""
    return {name: value for name, value in caption_labels(caption).items() if value != ABSENT}


def _jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def caption_files(captioner: Captioner, paths: Sequence[Path], *, out: Path, beam_size: int, batch_size: int,
                  max_pixels: int) -> CaptionResult:
    """Caption ``paths`` ``batch_size`` images at a time into ``out`` (JSON lines); the files skipped, with their
    reason, go to ``<out stem>.skipped.jsonl`` beside it. A :class:`PipelineError` when no image could be captioned."""
    rows: list[dict] = []
    skipped: list[dict[str, str]] = []
    with tqdm(total=len(paths), desc="caption", unit="image") as bar:
        for start in range(0, len(paths), batch_size):
            named, images = [], []
            for path in paths[start: start + batch_size]:
                try:
                    images.append(read_image(path, max_pixels=max_pixels))
                    named.append(path)
                except UnusableImage as exc:
                    log.warning("skipped %s: %s", path, exc)
                    skipped.append({"path": str(path), "reason": str(exc)})
            captions = captioner.caption(images, beam_size) if images else []
            rows += [{"path": str(p), "caption": c, "attributes": stated_attributes(c)}
                     for p, c in zip(named, captions)]
            bar.update(len(paths[start: start + batch_size]))
    skipped_file = out.with_name(f"{out.stem}.skipped.jsonl")
    atomic_write_text(skipped_file, _jsonl(skipped))
    if not rows:
        example = f" (e.g. {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
        raise PipelineError(f"no image captioned: all {len(paths)} files skipped{example}; list in {skipped_file}")
    atomic_write_text(out, _jsonl(rows))
    return CaptionResult(len(rows), skipped, out, skipped_file)


def student_captioner(folder: Path, *, runtime: Runtime) -> tuple[Captioner, int]:
    """The student saved in ``folder`` (a ``best/``) in ``runtime``, and its default beam size; a warning, once, when
    it was trained on synthetic renders. The ONNX runtime needs ``make export`` first and never imports torch."""
    meta = read_student_json(folder)
    beam_size = meta["beam_size"]
    if meta.get("training_data", {}).get("synthetic"):
        log.warning("%s was trained on %s: it has only seen such renders, and its captions of photographs mean "
                    "little", folder, meta["training_data"]["name"])
    if runtime == "onnx":
        from pipeline.students.onnx_runtime import OnnxStudent

        return OnnxStudent(folder), beam_size
    from pipeline.students.checkpoint import load_student

    return load_student(folder), beam_size


def teacher_captioner(cfg: Config, *, teacher_dir: Path, cpu: bool = False,
                      threads: int | None = None) -> EngineCaptioner:
    """The run's fine-tuned teacher (``teacher_dir``: the finetune stage's output over ``teacher.model``) on
    ``distill.engine``, captioning greedily up to ``distill.max_new_tokens``; on the GPU where there is one, unless
    ``cpu``. Close its ``engine`` when done."""
    from pipeline.core.rundir import require_stage
    from pipeline.teacher.engines import EngineCaptioner, open_engine

    require_stage(teacher_dir, "finetune")
    return EngineCaptioner(open_engine(cfg, teacher_dir, cpu=cpu, threads=threads),
                           max_new_tokens=cfg.distill.max_new_tokens)
