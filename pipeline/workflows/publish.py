"""A caption dataset of the run (the prepared ``data/`` or a distilled ``distill/<name>/``) as a folder that can be
pushed to the Hugging Face Hub as it is (`make publish`).

The run's own copy stays as the stages wrote it (splits train/val/test, absolute ``image_path``s). The published
copy is self-contained: Parquet shards under ``data/`` named by the Hub's split names (``train``, ``validation``,
``test``), each row's image embedded as a ``datasets.Image`` (its bytes and its file name), and the dataset card
``README.md`` beside them, with the licence and a ``configs`` block naming the shards.
``datasets.load_dataset(<folder>)`` reads it offline; ``huggingface-cli upload <repo> <folder> --repo-type dataset``
uploads it as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.rundir import RunDir, atomic_write_text, publish_dir, read_manifest
from pipeline.data.deepfashion import describe_dataset
from pipeline.data.formats import SPLITS, load_captions
from pipeline.reporting.cards import LICENSE, LICENSE_TEXT, front_matter, render_card

log = logging.getLogger(__name__)
HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # the run's split -> the Hub's
DROPPED = ("image_path", "split")  # local paths and the run's split name: the image and the shard say it
ROWS_PER_SHARD = 1000  # ~100 MB of full-size DeepFashion images: below the Hub's recommended shard size


def source_folder(rd: RunDir, dataset: str) -> Path:
    """The folder ``dataset`` names: ``data`` (the prepared dataset) or ``distill/<name>`` (or ``<name>``), finished."""
    name = dataset.strip("/")
    folder = rd.data if name == "data" else rd.distill(name.removeprefix("distill/"))
    if read_manifest(folder) is None or not (folder / "captions").is_dir():
        raise PipelineError(f"DATASET {dataset}: {folder} is not a finished caption dataset of the run (use data or "
                            f"distill/<name>: {', '.join(['data', *rd.distilled_sources()])})")
    return folder


def _rows(split, folder: Path) -> Iterator[dict]:
    for row in split:
        path = Path(row["image_path"])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PipelineError(f"{folder / 'captions'}: image {row['image_id']!r}: {path}: "
                                f"{exc.strerror or exc}") from None
        yield {"image": {"bytes": data, "path": path.name},
               **{k: v for k, v in row.items() if k not in DROPPED}}


def _card_for(folder: Path, name: str, counts: dict[str, int], data: dict) -> str:
    """The published copy's card: the dataset's own (a distilled one's ``README.md``) or the prepared data's, with
    the licence and the Hub's ``configs`` block naming the shards."""
    configs = {"configs": [{"config_name": "default", "data_files": [
        {"split": split, "path": f"data/{split}-*.parquet"} for split in counts]}]}
    own = folder / "README.md"
    if own.is_file():
        text = own.read_text()
        metadata = front_matter(text)
        body = text[text.index("\n---\n", 3) + 5:].lstrip("\n")
    else:
        metadata = {"pretty_name": f"fashion-distill {name}: {data['name']} captions", "language": ["en"],
                    "task_categories": ["image-to-text"], "tags": ["image-captioning", "fashion", "deepfashion",
                                                                   "fashion-distill"],
                    "source_datasets": [data["name"]], **LICENSE}
        body = (f"# {data['name']}: images and captions as fashion-distill prepared them\n\n"
                f"{'The images are synthetic renders of real captions, not photographs. ' if data['synthetic'] else ''}"
                f"Split by garment (no garment in two splits); the dataset's own captions.\n\n{LICENSE_TEXT}\n")
    split_text = ", ".join(f"{split} {n}" for split, n in counts.items())
    body += (f"\n## This copy\n\nPublished by `make publish` from the run's `{folder.name}/captions`: splits "
             f"{split_text} (the run's `val` is `validation` here), each image embedded in the `image` column "
             "(`datasets.Image`; its original file name as `path`), Parquet shards under `data/`. "
             "`datasets.load_dataset(\"<this folder or repo>\")` reads it.\n")
    return render_card({**metadata, **configs}, body)


def publish_dataset(rd: RunDir, dataset: str, out: Path, data_root: Path) -> dict[str, int]:
    """Write the Hub-ready copy of ``dataset`` (see :func:`source_folder`) of the run ``rd`` into ``out`` (published
    in one rename; an ``out`` this pipeline did not write is refused); the rows per Hub split."""
    from datasets import Dataset, Features, Image

    folder = source_folder(rd, dataset)
    captions = load_captions(folder / "captions")
    data = describe_dataset(data_root)
    counts = {}
    with publish_dir(out) as tmp:
        (tmp / "data").mkdir()
        for split in SPLITS:
            if split not in captions:
                continue
            part, hub = captions[split], HUB_SPLITS[split]
            features = Features({"image": Image(), **{k: v for k, v in part.features.items() if k not in DROPPED}})
            shards = max(1, -(-len(part) // ROWS_PER_SHARD))
            for i in range(shards):
                rows = list(_rows(part.shard(shards, i, contiguous=True), folder))
                Dataset.from_list(rows, features=features).to_parquet(
                    str(tmp / "data" / f"{hub}-{i:05d}-of-{shards:05d}.parquet"))
            counts[hub] = len(part)
            log.info("%s: %d rows in %d shard(s)", hub, len(part), shards)
        atomic_write_text(tmp / "README.md", _card_for(folder, folder.name, counts, data))
    return counts
