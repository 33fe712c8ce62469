"""DeepFashion-lite: a DeepFashion-MultiModal-shaped dataset with real captions and rendered images.

It is written in the real release's layout (``images/`` + ``captions.json``) or the course project's split variant
(``images/`` + ``train_captions.json`` / ``test_captions.json``), so ``prepare`` reads it exactly like the real data.
"""

from __future__ import annotations

import gzip
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.config import ConfigError, SyntheticData
from pipeline.data.attributes import parse_caption
from pipeline.data.render import render_outfit
from pipeline.rundir import atomic_write_json, publish_dir

log = logging.getLogger(__name__)
SPLIT_FILES = {"train": "train_captions.json", "test": "test_captions.json"}


def load_caption_pool(folder: Path | None = None) -> dict[str, dict[str, str]]:
    """The real DeepFashion-MultiModal captions by course split: from ``folder`` or the copy bundled here."""
    pool = {}
    for split, name in SPLIT_FILES.items():
        if folder is not None:
            pool[split] = json.loads((Path(folder) / name).read_text())
        else:
            blob = resources.files("pipeline.data").joinpath(f"resources/deepfashion_mm_{name}.gz").read_bytes()
            pool[split] = json.loads(gzip.decompress(blob))
    return pool


def _render_one(args: tuple[str, str, int, int, str]) -> None:
    name, caption, size, seed, out = args
    gender = "male" if name.startswith("MEN") else "female"
    render_outfit(parse_caption(caption), size, seed, gender).save(out, quality=92)


def generate(root: Path, cfg: SyntheticData, seed: int, workers: int = 2) -> dict[str, int]:
    """Write DeepFashion-lite with ``cfg.num_images`` images into ``root`` (atomically; deterministic per seed)."""
    pool = load_caption_pool(cfg.captions)
    rng = np.random.default_rng(seed)
    total = sum(len(v) for v in pool.values())
    if cfg.num_images > total:
        raise ConfigError(f"data.synthetic.num_images: {cfg.num_images} exceeds the {total} captions available")
    chosen: dict[str, dict[str, str]] = {}
    for split, captions in pool.items():
        n = round(cfg.num_images * len(captions) / total)
        names = sorted(captions)
        picked = rng.choice(len(names), size=min(n, len(names)), replace=False)
        chosen[split] = {names[i]: captions[names[i]] for i in sorted(picked)}
    with publish_dir(root) as tmp:
        (tmp / "images").mkdir()
        jobs = [(name, cap, cfg.image_size, seed * 1_000_003 + i, str(tmp / "images" / name))
                for i, (name, cap) in enumerate(sorted({**chosen["train"], **chosen["test"]}.items()))]
        with ProcessPoolExecutor(max_workers=workers) as ex:
            list(tqdm(ex.map(_render_one, jobs, chunksize=64), total=len(jobs), desc="render DeepFashion-lite",
                      unit="img"))
        if cfg.layout == "single":
            atomic_write_json(tmp / "captions.json", {**chosen["train"], **chosen["test"]})
        else:
            for split, name in SPLIT_FILES.items():
                atomic_write_json(tmp / name, chosen[split])
        atomic_write_json(tmp / "README.json", {"dataset": "DeepFashion-lite", "seed": seed, **cfg.model_dump(
            mode="json"), "counts": {k: len(v) for k, v in chosen.items()}})
    log.info("DeepFashion-lite: %d images in %s", len(jobs), root)
    return {k: len(v) for k, v in chosen.items()}
