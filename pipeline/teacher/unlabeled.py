"""Unlabelled images for distillation (``distill.unlabeled``): a folder of images without captions that the teacher
captions into the train split of a distilled dataset.

Every regular file under the folder (recursively, sorted; hidden files left out) is a candidate with the image id
``unlabeled/<path relative to the folder>``. Before any of them is captioned, each is checked against the prepared
dataset by the sha256 of its bytes and by its resolved path: a test image stops the run (no test image is ever
captioned for training); a train or val image is skipped (it is captioned already, with its own samples); so is a
file that does not decode as an image (prepare's check, ``data.check_images``). Skips are reasons, written to the
generation JSONL so that a resumed run does not check again, and listed in the dataset's ``rejected.json``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError
from pipeline.core.rundir import sha256_file
from pipeline.data.deepfashion import check_image
from pipeline.data.formats import ORIGIN_UNLABELED

ID_PREFIX = "unlabeled/"


def unlabeled_rows(folder: Path) -> list[dict[str, Any]]:
    """One train row per candidate file in ``folder`` (no caption yet); one line naming the key when it is not a
    folder."""
    if not folder.is_dir():
        raise PipelineError(f"distill.unlabeled: {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return [{"image_id": ID_PREFIX + p.relative_to(folder).as_posix(), "image_path": os.path.abspath(p),
             "split": "train", "origin": ORIGIN_UNLABELED} for p in files]


@dataclass
class DatasetImages:
    """The prepared dataset's images by content hash and by resolved path (what an unlabelled image may not be)."""

    by_hash: dict[str, tuple[str, str]]  # sha256 -> (split, image id)
    by_path: dict[str, tuple[str, str]]  # resolved path -> (split, image id)

    @classmethod
    def of(cls, rows: Iterable[dict[str, Any]]) -> DatasetImages:
        rows = list(rows)
        return cls({sha256_file(r["image_path"]): (r["split"], r["image_id"]) for r in rows},
                   {os.path.realpath(r["image_path"]): (r["split"], r["image_id"]) for r in rows})

    def match(self, path: str) -> tuple[str, str, str] | None:
        """``(split, image id, how)`` of the dataset image ``path`` is, else ``None``."""
        hit = self.by_path.get(os.path.realpath(path))
        if hit is not None:
            return (*hit, "same file")
        hit = self.by_hash.get(sha256_file(path))
        return None if hit is None else (*hit, "same bytes (sha256)")


def screen(rows: Iterable[dict[str, Any]], dataset: DatasetImages, check: str) -> dict[str, str]:
    """Reasons to skip unlabelled ``rows`` by image id (the rest are captioned). A test image raises, naming the
    file."""
    skipped = {}
    for r in rows:
        hit = dataset.match(r["image_path"])
        if hit is not None and hit[0] == "test":
            raise PipelineError(f"{r['image_path']}: is test image {hit[1]!r} ({hit[2]}); remove it from "
                                "distill.unlabeled: test images are never captioned for training")
        if hit is not None:
            skipped[r["image_id"]] = f"{hit[0]} image {hit[1]!r} ({hit[2]}), captioned as such"
            continue
        problem = check_image(Path(r["image_path"]), check)
        if problem:
            skipped[r["image_id"]] = problem
    return skipped
