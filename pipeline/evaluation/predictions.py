"""Read a file of test-split captions from anywhere (another model, an earlier run, a spreadsheet) and match it to
the run's ground-truth test split, so `evaluate` can score it like a student.

Formats: JSONL (one object per line), JSON (an object ``{id: caption}`` or a list of objects), CSV (a header row).
Objects and CSV rows name the image in one of ``ID_KEYS`` and the caption in one of ``CAPTION_KEYS``; an id may be the
dataset's image id, the image's file name or its path as the prepared dataset names it; a path to a copy elsewhere
(`make caption` on copied test images) is matched by its file name.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.jsonlimits import json_limit_reason
from pipeline.data.text import MAX_CAPTION_WORDS

ID_KEYS = ("image_id", "id", "image", "file_name", "filename", "image_path", "path")
CAPTION_KEYS = ("caption", "prediction", "text", "hypothesis")


class PredictionsError(PipelineError):
    """A predictions file is unreadable, or a record in it does not fit the test split."""


def _records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) pairs: ``where`` names the record for error messages."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's byte order mark is not part of the header
    except (OSError, UnicodeDecodeError) as exc:
        raise PredictionsError(f"{path}: cannot read predictions ({exc})") from None
    if suffix == ".csv":
        reader, rows = csv.DictReader(text.splitlines()), None
        try:
            if reader.fieldnames is not None:  # reads the header, row 1
                rows = []
                for record in reader:
                    rows.append(record)
        except csv.Error as exc:  # e.g. a field over csv.field_size_limit()
            raise PredictionsError(f"{path}: row {1 if rows is None else len(rows) + 2}: {exc}") from None
        yield from ((f"row {i + 2}", r) for i, r in enumerate(rows or []))
    elif suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield f"line {i}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PredictionsError(f"{path}: line {i} is not valid JSON ({exc.msg})") from None
                except (RecursionError, ValueError) as exc:
                    raise PredictionsError(f"{path}: line {i}: {json_limit_reason(line, exc)}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PredictionsError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except (RecursionError, ValueError) as exc:
            raise PredictionsError(f"{path}: {json_limit_reason(text, exc)}") from None
        if isinstance(data, dict):
            yield from ((f"key {k!r}", {"image_id": k, "caption": v}) for k, v in data.items())
        elif isinstance(data, list):
            yield from ((f"item {i}", r) for i, r in enumerate(data))
        else:
            raise PredictionsError(f"{path}: expected a JSON object {{id: caption}} or a list of records")
    else:
        raise PredictionsError(f"{path}: unknown predictions format {suffix or '(no suffix)'!r}; use .jsonl, .json "
                               "or .csv")


def _field(record: dict, keys: Sequence[str]) -> object:
    return next((record[k] for k in keys if k in record), None)


def _by_file_name(path: Path, where: str, image: str, by_name: dict[str, set[str]]) -> str:
    """The test image whose file name ``image`` (an id, a name or a path anywhere) ends in."""
    ids = sorted(by_name.get(Path(image.replace("\\", "/")).name, ()))
    if not ids:
        shown = repr(image) if len(image) <= 100 else f"{image[:40]!r}... ({len(image)} characters)"
        raise PredictionsError(f"{path}: {where}: image {shown} is not in the test split")
    if len(ids) > 1:
        raise PredictionsError(f"{path}: {where}: file name of {image!r} names {len(ids)} test images "
                               f"({', '.join(ids[:3])}); use the image id")
    return ids[0]


def read_predictions(path: str | Path, test_rows: Sequence[dict], allow_missing: bool = False) -> dict[str, str]:
    """Captions of ``path`` by test image id. Fails on the first record that is not a usable prediction of a test
    image, and on test images without a prediction unless ``allow_missing``."""
    path = Path(path)
    lookup: dict[str, str] = {}
    by_name: dict[str, set[str]] = {}  # file name -> the test image ids of that name
    for r in test_rows:
        for key in (r["image_id"], r["image_path"]):
            lookup.setdefault(key, r["image_id"])
        by_name.setdefault(Path(r["image_path"]).name, set()).add(r["image_id"])
    out: dict[str, str] = {}
    for where, record in _records(path):
        if not isinstance(record, dict):
            raise PredictionsError(f"{path}: {where}: expected an object with an image id and a caption")
        image, caption = _field(record, ID_KEYS), _field(record, CAPTION_KEYS)
        if image is None:
            raise PredictionsError(f"{path}: {where}: no image id (one of {', '.join(ID_KEYS)})")
        if caption is None:
            raise PredictionsError(f"{path}: {where}: no caption (one of {', '.join(CAPTION_KEYS)})")
        if not isinstance(caption, str) or not caption.strip():
            raise PredictionsError(f"{path}: {where} ({image}): the caption is "
                                   f"{'empty' if isinstance(caption, str) else type(caption).__name__}")
        if len(caption.split()) > MAX_CAPTION_WORDS:
            raise PredictionsError(f"{path}: {where} ({image}): the caption has {len(caption.split())} words, more "
                                   f"than a caption has ({MAX_CAPTION_WORDS})")
        image_id = lookup.get(str(image)) or _by_file_name(path, where, str(image), by_name)
        if image_id in out:
            raise PredictionsError(f"{path}: {where}: a second prediction for test image {image_id!r}")
        out[image_id] = caption
    if not out:
        raise PredictionsError(f"{path}: no predictions in the file")
    missing = [r["image_id"] for r in test_rows if r["image_id"] not in out]
    if missing and not allow_missing:
        raise PredictionsError(f"{path}: {len(missing)} of {len(test_rows)} test images have no prediction (e.g. "
                               f"{', '.join(missing[:3])}); pass --allow-missing to score the others")
    return out
