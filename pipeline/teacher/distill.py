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

from tqdm import tqdm

from pipeline.data.images import load_rgb
from pipeline.teacher.generate import generate_captions

log = logging.getLogger(__name__)


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
