"""Read a DeepFashion-MultiModal folder (real or DeepFashion-lite), validate every record, split deterministically.

Layouts: ``single`` = ``images/`` + ``captions.json`` ({file name: caption}); ``split`` = ``images/`` +
``train_captions.json`` + ``test_captions.json`` (the course project's split, kept as is).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from PIL import Image
from tqdm import tqdm

from pipeline.core.errors import PipelineError
from pipeline.core.jsonlimits import json_limit_reason
from pipeline.data.images import not_a_file
from pipeline.data.text import MAX_CAPTION_WORDS, normalise

SINGLE_FILE = "captions.json"
SPLIT_FILES = {"train": "train_captions.json", "test": "test_captions.json"}
IMAGE_DIR = "images"


SOURCE = "https://github.com/yumingj/DeepFashion-MultiModal"  # the real dataset's home: download links, agreement
SYNTHETIC_NAME = "DeepFashion-lite (synthetic renders of real captions)"


def describe_dataset(root: Path) -> dict[str, object]:
    """What the raw dataset at ``root`` is, for cards and labels: DeepFashion-lite (its ``README.json``, written by
    the demo's generator, says so) or else the real DeepFashion-MultiModal. ``name``, ``synthetic``, ``source``."""
    readme = Path(root) / "README.json"
    try:
        synthetic = json.loads(readme.read_text()).get("dataset") == "DeepFashion-lite"
    except (OSError, ValueError, AttributeError):
        synthetic = False
    return {"name": SYNTHETIC_NAME if synthetic else "DeepFashion-MultiModal", "synthetic": synthetic,
            "source": SOURCE}


class DataError(PipelineError):
    """The raw dataset is unusable; the message names the file or record."""


@dataclass
class Record:
    image_id: str
    file_name: str  # relative to <root>/images
    image_path: str  # absolute
    caption: str
    split: str  # train | val | test


@dataclass
class Problem:
    file: str
    record: str
    reason: str


def detect_layout(root: Path, layout: Literal["auto", "single", "split"] = "auto") -> str:
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a folder")
    has_single = (root / SINGLE_FILE).is_file()
    has_split = all((root / f).is_file() for f in SPLIT_FILES.values())
    if layout == "auto":
        if has_split:
            return "split"
        if has_single:
            return "single"
        raise DataError(f"{root}: neither {SINGLE_FILE} nor {' + '.join(SPLIT_FILES.values())} found")
    missing = [f for f in ([SINGLE_FILE] if layout == "single" else SPLIT_FILES.values()) if not (root / f).is_file()]
    if missing:
        raise DataError(f"{root}: data.layout={layout} but {', '.join(missing)} missing")
    return layout


def load_caption_file(path: Path) -> list[tuple[str, object]]:
    """Key/value pairs of a JSON object file, duplicates kept (plain json.load would silently drop them); anything
    else is one DataError naming the file. Every reader of a dataset's caption files reads them through this."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark is not part of the JSON
        pairs = json.loads(text, object_pairs_hook=lambda kv: kv)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    except (RecursionError, ValueError) as exc:
        raise DataError(f"{path}: {json_limit_reason(text, exc)}") from None
    if not isinstance(pairs, list) or (pairs and not isinstance(pairs[0], tuple)):
        raise DataError(f"{path}: expected a JSON object mapping image file name -> caption")
    return pairs


def item_group(file_name: str) -> str:
    """DeepFashion item id (all views of one garment share it), so splits never leak an item across."""
    m = re.search(r"id_\d+", file_name)
    return m.group(0) if m else file_name


def unit_hash(*parts: object) -> float:
    """Deterministic number in [0, 1) from ``parts`` (independent of order, platform and PYTHONHASHSEED)."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def check_image(path: Path, mode: str) -> str | None:
    """Why ``path`` is not a usable image (``mode`` ``decode``: decoded in full; ``header``: header verified), or
    ``None``."""
    if (reason := not_a_file(path)) is not None:
        return reason
    try:
        with Image.open(path) as im:
            if mode == "decode":
                im.load()
            else:
                im.verify()
    except FileNotFoundError:
        return "missing image file"
    except Exception as exc:  # PIL raises many types for corrupt files
        return f"unreadable image ({type(exc).__name__}: {exc})"
    return None


def read_dataset(root: Path, layout: str, *, seed: int, test_fraction: float, val_fraction: float,
                 check_images: str = "decode", workers: int = 2) -> tuple[list[Record], list[Problem]]:
    """All valid records with their split, plus one Problem per rejected record (never silently dropped)."""
    layout = detect_layout(root, layout)  # type: ignore[arg-type]
    files = {None: SINGLE_FILE} if layout == "single" else dict(SPLIT_FILES)
    candidates: list[tuple[str, str | None, str, object]] = []
    for split, name in files.items():
        candidates += [(name, split, key, value) for key, value in load_caption_file(root / name)]

    problems: list[Problem] = []
    seen: dict[str, str] = {}
    accepted: list[tuple[str, str | None, str, str]] = []
    for file, split, key, value in candidates:
        image_id = Path(key).stem
        if not isinstance(value, str):
            problems.append(Problem(file, key, f"caption is {type(value).__name__}, not a string"))
        elif not value.strip():
            problems.append(Problem(file, key, "empty caption"))
        elif len(value.split()) > MAX_CAPTION_WORDS:
            problems.append(Problem(file, key, f"caption of {len(value.split())} words (at most {MAX_CAPTION_WORDS})"))
        elif not key or Path(key).is_absolute() or ".." in Path(key).parts:
            problems.append(Problem(file, key, "invalid image file name"))
        elif image_id in seen:
            problems.append(Problem(file, key, f"duplicate image id {image_id!r} (first seen in {seen[image_id]})"))
        else:
            seen[image_id] = file
            accepted.append((file, split, key, normalise(value)))

    image_dir = root / IMAGE_DIR
    with ThreadPoolExecutor(max_workers=workers) as ex:
        checks = list(tqdm(ex.map(lambda a: check_image(image_dir / a[2], check_images), accepted, chunksize=256),
                           total=len(accepted), desc="check images", unit="img", disable=len(accepted) < 2000))
    records = []
    for (file, split, key, caption), problem in zip(accepted, checks):
        if problem:
            problems.append(Problem(file, key, f"{problem}: {image_dir / key}"))
            continue
        group = item_group(key)
        if split is None:
            split = "test" if unit_hash(seed, "test", group) < test_fraction else "train"
        if split == "train" and unit_hash(seed, "val", group) < val_fraction:
            split = "val"
        # absolute but not resolved: an image that is a symlink (DVC, git-annex) keeps the name the dataset gives it
        records.append(Record(Path(key).stem, key, os.path.abspath(image_dir / key), caption, split))
    return records, problems


def problems_as_dicts(problems: list[Problem]) -> list[dict[str, str]]:
    return [asdict(p) for p in problems]
