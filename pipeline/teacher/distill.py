"""Resumable, shardable caption generation: one JSONL line per (image, sample), appended and fsynced per batch.

Each row to caption names how many ``samples`` it wants (``distill.samples_per_image`` for train, val and unlabelled
images, one for test images). A rerun after ``kill -9`` reads what is there (a torn last line is ignored), skips
those (image id, sample) keys and appends the rest; because sample j of an image is seeded from (run seed, image id,
j), the final set equals an uninterrupted run's whatever the batch size, shard count or resumes. Unlabelled images
are screened (:mod:`pipeline.teacher.unlabeled`) before any is captioned; a skipped one gets a line with its reason
(``skipped``) instead of captions.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.core.config import Config
from pipeline.core.errors import PipelineError
from pipeline.core.rundir import record_entries
from pipeline.data.formats import ORIGIN_UNLABELED
from pipeline.data.images import load_rgb
from pipeline.teacher.engines import CaptionEngine, open_engine
from pipeline.teacher.unlabeled import DatasetImages, screen

log = logging.getLogger(__name__)


def parse_shard(text: str | None) -> tuple[int, int]:
    """``(i, n)`` of ``--shard i/n``; without it the Slurm array task's, else ``(0, 1)``."""
    if text is None:
        if "SLURM_ARRAY_TASK_ID" in os.environ:
            return int(os.environ["SLURM_ARRAY_TASK_ID"]), int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise PipelineError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise PipelineError(f"--shard {text}: i must be in [0, {n})")
    return i, n


def shard_file(out: Path, i: int, n: int) -> Path:
    """The generation JSONL of shard ``i`` of ``n`` in ``out``."""
    return out / ("generations.jsonl" if n == 1 else f"generations.shard-{i}-of-{n}.jsonl")


def shard_count(out: Path) -> int:
    """How many shards the generation files in ``out`` were written for (1 when unsharded)."""
    counts = {int(p.name.rsplit("-of-", 1)[1].split(".")[0]) for p in out.glob("generations.shard-*-of-*.jsonl")}
    if len(counts) > 1:
        raise PipelineError(f"{out}: generation shards for different shard counts {sorted(counts)}; rerun with --force")
    return counts.pop() if counts else 1


def shard_rows(rows: list[dict[str, Any]], index: int, count: int) -> list[dict[str, Any]]:
    """The ``index``-th of ``count`` disjoint slices (by position in image-id order; all samples of an image are in
    one slice)."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: index must be in [0, {count})")
    ordered = sorted(rows, key=lambda r: r["image_id"])
    return ordered[index::count]


Key = tuple[str, int]  # (image id, sample number)


def read_generations(path: Path) -> dict[Key, dict[str, Any]]:
    """Records of a generation JSONL by (image id, sample) (a line without ``sample``, as written before there were
    several, is sample 0); a torn (partial) line from a crash is skipped."""
    out: dict[Key, dict[str, Any]] = {}
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break  # torn write at the end
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.setdefault((rec["image_id"], rec.get("sample", 0)), rec)
    return out


def _truncate_torn_tail(path: Path) -> None:
    """Drop a partial last line so appends start on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def _batches(tasks: list[tuple[dict[str, Any], int]], size: int) -> Iterator[list[tuple[dict[str, Any], int]]]:
    for i in range(0, len(tasks), size):
        yield tasks[i: i + size]


def _append(fh, records: list[dict[str, Any]]) -> None:
    fh.write("".join(json.dumps(r) + "\n" for r in records))
    fh.flush()
    os.fsync(fh.fileno())


def skipped_images(done: dict[Key, dict[str, Any]]) -> dict[str, str]:
    """The images a generation JSONL records as skipped, with the reason."""
    return {image_id: rec["skipped"] for (image_id, _), rec in done.items() if "skipped" in rec}


def screen_unlabeled(rows: list[dict[str, Any]], path: Path, dataset: DatasetImages, check: str) -> None:
    """Screen the unlabelled ``rows`` not yet in ``path`` against ``dataset`` (a test image raises) and append a
    ``skipped`` line for each one that is not to be captioned."""
    done = {image_id for image_id, _ in read_generations(path)}
    todo = [r for r in rows if r.get("origin") == ORIGIN_UNLABELED and r["image_id"] not in done]
    if not todo:
        return
    skipped = screen(todo, dataset, check)
    for image_id, reason in list(skipped.items())[:10]:
        log.warning("unlabelled image %s skipped: %s", image_id, reason)
    _truncate_torn_tail(path)
    record_entries(path.parent, [path.name])
    with open(path, "a", encoding="utf-8") as fh:
        _append(fh, [{"image_id": i, "sample": 0, "skipped": reason} for i, reason in skipped.items()])
    log.info("%d unlabelled images screened: %d to caption, %d skipped", len(todo), len(todo) - len(skipped),
             len(skipped))


def generate_to_jsonl(engine: CaptionEngine, rows: list[dict[str, Any]], path: Path, *, seed: int,
                      temperature: float, top_p: float, max_new_tokens: int, batch_size: int,
                      desc: str = "distill") -> dict[str, float]:
    """Caption with ``engine`` samples ``0 .. row["samples"]-1`` (default 1) of every row that are not yet in
    ``path`` and whose image is not recorded as skipped; returns throughput figures for this call."""
    done = read_generations(path)
    skipped = skipped_images(done)
    tasks = [(r, j) for r in rows if r["image_id"] not in skipped for j in range(r.get("samples", 1))]
    todo = [(r, j) for r, j in tasks if (r["image_id"], j) not in done]
    if done:
        log.info("%s: %d of %d captions already generated; resuming", path.name, len(tasks) - len(todo), len(tasks))
    _truncate_torn_tail(path)
    record_entries(path.parent, [path.name])  # listed in the folder's marker before it exists
    started, n = time.perf_counter(), 0
    with open(path, "a", encoding="utf-8") as fh, tqdm(total=len(todo), desc=desc, unit="caption") as bar:
        for batch in _batches(todo, batch_size):
            loaded = {p: load_rgb(p) for p in dict.fromkeys(r["image_path"] for r, _ in batch)}  # once per batch
            images = [loaded[r["image_path"]] for r, _ in batch]
            gens = engine.generate(images, [r["image_id"] for r, _ in batch], samples=[j for _, j in batch],
                                   seed=seed, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
            _append(fh, [{"image_id": r["image_id"], "sample": j, **asdict(g)} for (r, j), g in zip(batch, gens)])
            n += len(batch)
            bar.update(len(batch))
            bar.set_postfix(captions_per_s=f"{n / (time.perf_counter() - started):.1f}")
    seconds = time.perf_counter() - started
    return {"generated": n, "seconds": round(seconds, 3), "captions_per_second": round(n / seconds, 3) if n else None}


def generate_shard(cfg: Config, rows: list[dict[str, Any]], out: Path, *, shard: tuple[int, int], teacher_dir: Path,
                   dataset: DatasetImages | None) -> dict[str, Any]:
    """Caption shard ``(i, n)`` of ``rows`` with the fine-tuned teacher of ``teacher_dir`` on ``distill.engine`` into
    its JSONL in ``out`` (resuming), its unlabelled rows screened against the prepared ``dataset``'s images first
    (``None``: there are none); its throughput (and the engine's name and version)."""
    d = cfg.distill
    mine, path = shard_rows(rows, *shard), shard_file(out, *shard)
    if dataset is not None:
        screen_unlabeled(mine, path, dataset, cfg.data.check_images)
    engine = open_engine(cfg, teacher_dir)
    try:
        figures = generate_to_jsonl(engine, mine, path, seed=cfg.seed, temperature=d.temperature, top_p=d.top_p,
                                    max_new_tokens=d.max_new_tokens, batch_size=d.batch_size,
                                    desc=f"distill {d.dataset_name} T={d.temperature} ({engine.name})")
    finally:
        engine.close()
    return {**figures, "engine": engine.name, "engine_version": engine.version}
