"""Resumable, shardable caption generation: one JSONL line per image, appended and fsynced per batch.

A rerun after ``kill -9`` reads what is there (a torn last line is ignored), skips those images and appends the
rest; because every caption is seeded from (run seed, image id), the final set equals an uninterrupted run's.
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

import torch
from tqdm import tqdm

from pipeline.config import Config
from pipeline.data.images import load_rgb
from pipeline.errors import PipelineError
from pipeline.teacher.generate import generate_captions
from pipeline.teacher.loading import load_processor, load_teacher

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
    """The ``index``-th of ``count`` disjoint slices (by position in image-id order)."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: index must be in [0, {count})")
    ordered = sorted(rows, key=lambda r: r["image_id"])
    return ordered[index::count]


def read_generations(path: Path) -> dict[str, dict[str, Any]]:
    """Records of a generation JSONL by image id; a torn (partial) line from a crash is skipped."""
    out: dict[str, dict[str, Any]] = {}
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
            out.setdefault(rec["image_id"], rec)
    return out


def _truncate_torn_tail(path: Path) -> None:
    """Drop a partial last line so appends start on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def _batches(rows: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for i in range(0, len(rows), size):
        yield rows[i: i + size]


def generate_to_jsonl(model, processor, rows: list[dict[str, Any]], path: Path, *, seed: int, temperature: float,
                      top_p: float, max_new_tokens: int, batch_size: int, desc: str = "distill") -> dict[str, float]:
    """Caption every row not yet in ``path``; returns throughput figures for this call."""
    done = read_generations(path)
    todo = [r for r in rows if r["image_id"] not in done]
    if done:
        log.info("%s: %d of %d images already generated; resuming", path.name, len(rows) - len(todo), len(rows))
    _truncate_torn_tail(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    started, n = time.perf_counter(), 0
    with open(path, "a", encoding="utf-8") as fh, tqdm(total=len(todo), desc=desc, unit="img") as bar:
        for batch in _batches(todo, batch_size):
            images = [load_rgb(r["image_path"]) for r in batch]
            gens = generate_captions(model, processor, images, [r["image_id"] for r in batch], seed=seed,
                                     temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
            fh.write("".join(json.dumps({"image_id": r["image_id"], **asdict(g)}) + "\n"
                             for r, g in zip(batch, gens)))
            fh.flush()
            os.fsync(fh.fileno())
            n += len(batch)
            bar.update(len(batch))
            bar.set_postfix(img_per_s=f"{n / (time.perf_counter() - started):.1f}")
    seconds = time.perf_counter() - started
    return {"generated": n, "seconds": round(seconds, 3), "images_per_second": round(n / seconds, 3) if n else None}


def generate_shard(cfg: Config, rows: list[dict[str, Any]], out: Path, *, shard: tuple[int, int], model_dir: Path,
                   adapter: Path | None) -> dict[str, float]:
    """Caption shard ``(i, n)`` of ``rows`` with the teacher into its JSONL in ``out`` (resuming); its throughput."""
    d = cfg.distill
    processor = load_processor(adapter or model_dir)
    model = load_teacher(model_dir, adapter, precision=cfg.teacher.precision,
                         attn_implementation=cfg.teacher.attn_implementation,
                         device_map="auto" if torch.cuda.is_available() else None, merge=True)
    return generate_to_jsonl(model, processor, shard_rows(rows, *shard), shard_file(out, *shard), seed=cfg.seed,
                             temperature=d.temperature, top_p=d.top_p, max_new_tokens=d.max_new_tokens,
                             batch_size=d.batch_size, desc=f"distill {d.dataset_name} T={d.temperature}")
