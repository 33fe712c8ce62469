"""The caption dataset schema and its exports: HF `datasets` on disk, LLaVA conversations, Karpathy JSON, stats."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.data.text import tokenize

INSTRUCTION = "Please describe this image in deepfashion dataset style."
SPLITS = ("train", "val", "test")
COLUMNS = ("image_id", "image_path", "caption", "split", "source")
# a distilled dataset's columns beyond COLUMNS: `sample` j of the image's k teacher captions, and `origin`: whether
# the image is one of the prepared dataset's or came from the unlabelled folder (distill.unlabeled)
DISTILL_COLUMNS = {"sample": "int32", "origin": "string"}
ORIGIN_DATASET, ORIGIN_UNLABELED = "dataset", "unlabeled"


def to_hf_dataset(rows: Sequence[dict[str, Any]], extra: Mapping[str, str] | None = None):
    """A `datasets.DatasetDict` with the columns in COLUMNS (strings), then the ``extra`` columns (name -> `datasets`
    dtype), and one entry per non-empty split of SPLITS.

    Empty splits are left out: `datasets` cannot reload a zero-row split saved to disk.
    """
    from datasets import Dataset, DatasetDict, Features, Value, disable_progress_bars

    disable_progress_bars()  # per-save bars for a few thousand rows are noise in the stage logs
    features = Features({**{c: Value("string") for c in COLUMNS}, **{c: Value(t) for c, t in (extra or {}).items()}})
    by_split = {s: [r for r in rows if r["split"] == s] for s in SPLITS}
    return DatasetDict({
        split: Dataset.from_dict({c: [r[c] for r in part] for c in features}, features=features)
        for split, part in by_split.items() if part
    })


def save_captions(dataset, folder: Path) -> None:
    """``dataset.save_to_disk(folder)``; a write that fails inside `datasets` without naming its file (a full disk
    when fsspec closes it) names ``folder``."""
    try:
        dataset.save_to_disk(str(folder))
    except OSError as exc:
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(folder)) from exc


def split_rows(dataset, split: str) -> list[dict[str, Any]]:
    """Rows of one split of a caption DatasetDict as plain dicts ([] when the split is empty)."""
    return dataset[split].to_list() if split in dataset else []


def load_captions(folder: str | Path):
    """Load a caption dataset written by `prepare` or `distill` (a `datasets.DatasetDict`)."""
    from datasets import load_from_disk

    return load_from_disk(str(folder))


def load_splits(folder: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The rows of every split (``SPLITS``) of the caption dataset in ``folder``, as plain dicts."""
    data = load_captions(folder)
    return {s: split_rows(data, s) for s in SPLITS}


def llava_conversations(rows: Iterable[dict[str, Any]], image_root: Path) -> list[dict[str, Any]]:
    """Records in the original LLaVA repo's fine-tuning format; `image` is relative to `image_root`."""
    out = []
    for r in rows:
        out.append({
            "id": r["image_id"],
            "image": Path(r["image_path"]).relative_to(image_root).as_posix(),
            "conversations": [
                {"from": "human", "value": f"<image>\n{INSTRUCTION}"},
                {"from": "gpt", "value": r["caption"]},
            ],
        })
    return out


def karpathy_json(rows: Sequence[dict[str, Any]], dataset: str = "deepfashion") -> dict[str, Any]:
    """The Karpathy/flickr8k layout the course project trained from (one sentence per image)."""
    images = []
    for imgid, r in enumerate(rows):
        images.append({
            "filename": Path(r["image_path"]).name,
            "filepath": str(Path(r["image_path"]).parent),
            "imgid": imgid,
            "image_id": r["image_id"],
            "split": r["split"],
            "sentids": [imgid],
            "sentences": [{"raw": r["caption"], "tokens": tokenize(r["caption"], keep_punct=False),
                           "imgid": imgid, "sentid": imgid}],
        })
    return {"dataset": dataset, "images": images}


def caption_stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts per split, caption length distribution (words) and vocabulary size, also for each minimum word count
    1-10 (so the stats do not depend on `students.min_word_count`)."""
    lengths = [len(tokenize(r["caption"], keep_punct=False)) for r in rows]
    words = Counter(w for r in rows if r["split"] == "train" for w in tokenize(r["caption"], keep_punct=False))
    out: dict[str, Any] = {
        "counts": {s: sum(r["split"] == s for r in rows) for s in SPLITS},
        "total": len(rows),
        "vocabulary": {"train_words": len(words),
                       "train_words_by_min_count": {k: sum(c >= k for c in words.values()) for k in range(1, 11)}},
    }
    if lengths:
        q = statistics.quantiles(lengths, n=20) if len(lengths) > 1 else [lengths[0]] * 19
        out["caption_length_words"] = {
            "mean": round(statistics.fmean(lengths), 3), "min": min(lengths), "max": max(lengths),
            "p5": q[0], "p50": statistics.median(lengths), "p95": q[-1],
            "histogram": dict(sorted(Counter(lengths).items())),
        }
    return out
