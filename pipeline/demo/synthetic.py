"""DeepFashion-lite: a DeepFashion-MultiModal-shaped dataset with real captions and rendered images.

It is written in the real release's layout (``images/`` + ``captions.json``) or the course project's split variant
(``images/`` + ``train_captions.json`` / ``test_captions.json``), so ``prepare`` reads it exactly like the real data.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.config import ConfigError, SyntheticData
from pipeline.core.rundir import atomic_write_json, publish_dir
from pipeline.data.attributes import parse_caption
from pipeline.data.deepfashion import load_caption_file
from pipeline.demo.render import RENDERER_VERSION, render_outfit

log = logging.getLogger(__name__)
SPLIT_FILES = {"train": "train_captions.json", "test": "test_captions.json"}


def load_caption_pool(folder: Path | None = None) -> dict[str, dict[str, str]]:
    """The real DeepFashion-MultiModal captions by course split: from ``folder`` or the copy bundled here."""
    pool = {}
    for split, name in SPLIT_FILES.items():
        if folder is not None:
            pool[split] = json.loads((Path(folder) / name).read_text())
        else:
            blob = resources.files("pipeline.demo").joinpath(f"resources/deepfashion_mm_{name}.gz").read_bytes()
            pool[split] = json.loads(gzip.decompress(blob))
    return pool


def _render_one(args: tuple[str, str, int, int, str]) -> None:
    name, caption, size, seed, out = args
    gender = "male" if name.startswith("MEN") else "female"
    try:
        render_outfit(parse_caption(caption), size, seed, gender).save(out, quality=92)
    except OSError as exc:  # a full disk: PIL's failed write names no file
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), out) from None


def _render_into(root: Path, captions: dict[str, str], size: int, seed_base: int, workers: int, desc: str,
                 write_captions) -> None:
    """Render ``captions`` (file name -> caption) into ``root/images`` and let ``write_captions(folder)`` add the
    caption files; published in one rename."""
    with publish_dir(root) as tmp:
        (tmp / "images").mkdir()
        jobs = [(name, cap, size, seed_base + i, str(tmp / "images" / name))
                for i, (name, cap) in enumerate(sorted(captions.items()))]
        with ProcessPoolExecutor(max_workers=workers) as ex:
            list(tqdm(ex.map(_render_one, jobs, chunksize=64), total=len(jobs), desc=desc, unit="img"))
        write_captions(tmp)


def dataset_settings(cfg: SyntheticData, seed: int) -> dict:
    """What DeepFashion-lite depends on (its README.json, less the counts): regenerated when any of it changes."""
    return {"dataset": "DeepFashion-lite", "renderer": RENDERER_VERSION, "seed": seed, **cfg.model_dump(mode="json")}


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

    def write_captions(tmp: Path) -> None:
        if cfg.layout == "single":
            atomic_write_json(tmp / "captions.json", {**chosen["train"], **chosen["test"]})
        else:
            for split, name in SPLIT_FILES.items():
                atomic_write_json(tmp / name, chosen[split])
        atomic_write_json(tmp / "README.json", {**dataset_settings(cfg, seed),
                                                "counts": {k: len(v) for k, v in chosen.items()}})

    _render_into(root, {**chosen["train"], **chosen["test"]}, cfg.image_size, seed * 1_000_003, workers,
                 "render DeepFashion-lite", write_captions)
    log.info("DeepFashion-lite: %d images in %s", sum(len(v) for v in chosen.values()), root)
    return {k: len(v) for k, v in chosen.items()}


def dataset_names(root: Path) -> set[str]:
    """The image file names a DeepFashion-MultiModal folder has captions for (either layout); a malformed caption
    file is the one line `prepare` gives for it."""
    names: set[str] = set()
    for file in ("captions.json", *SPLIT_FILES.values()):
        if (root / file).is_file():
            names.update(key for key, _ in load_caption_file(root / file))
    return names


def held_out_settings(purpose: str, count: int, cfg: SyntheticData, seed: int, exclude: set[str]) -> dict:
    """What a held-out image set depends on (its README.json): rebuilt when any of it changes."""
    return {"dataset": f"DeepFashion-lite {purpose}", "renderer": RENDERER_VERSION, "seed": seed, "images": count,
            "image_size": cfg.image_size, "captions": str(cfg.captions) if cfg.captions else "bundled",
            "excluded": hashlib.sha256("\n".join(sorted(exclude)).encode()).hexdigest()}


def generate_held_out(root: Path, purpose: str, count: int, cfg: SyntheticData, seed: int, exclude: set[str],
                      workers: int = 2) -> None:
    """Render ``count`` images of real captions that are not in ``exclude`` (the dataset's images, and any other
    held-out set) into ``root``: ``images/`` + ``captions.json`` + ``README.json``. Unchanged settings: nothing to
    do."""
    settings = held_out_settings(purpose, count, cfg, seed, exclude)
    readme = root / "README.json"
    if readme.is_file() and json.loads(readme.read_text()) == settings:
        return
    pool = load_caption_pool(cfg.captions)
    free = sorted((set(pool["train"]) | set(pool["test"])) - exclude)
    if count > len(free):
        raise ConfigError(f"data.{purpose}.images: {count} exceeds the {len(free)} captions outside the dataset")
    everything = {**pool["train"], **pool["test"]}
    offset = int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:3], "big")  # each purpose its own draw
    rng = np.random.default_rng([seed, offset])
    picked = {free[i]: everything[free[i]] for i in sorted(rng.choice(len(free), size=count, replace=False))}

    def write_captions(tmp: Path) -> None:
        atomic_write_json(tmp / "captions.json", picked)
        atomic_write_json(tmp / "README.json", settings)

    _render_into(root, picked, cfg.image_size, seed * 1_000_003 + 100_000_000 + offset, workers,
                 f"render {purpose} images", write_captions)
    log.info("%s images: %d rendered in %s (captions in no split)", purpose, count, root)
