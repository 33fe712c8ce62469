"""The base checkpoint the teacher fine-tunes: used as it is, or the demo's tiny LLaVA where it is missing.

A real run downloads a pretrained LLaVA; the demo's stand-in for that download is the pretrained tiny LLaVA bundled in
:data:`BUNDLED` (built by ``scripts/bundle_tiny_llava.py`` with ``configs/demo.yaml``'s settings, ~6 CPU minutes). It
is copied when its record matches exactly what a build would use (shape, pretraining recipe and settings, seed,
pretraining images, tokenizer texts); any other setting builds the tiny LLaVA here, as the bundle was built.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.cpus import rank
from pipeline.core.rundir import output_lock, publish_dir
from pipeline.data.formats import INSTRUCTION

log = logging.getLogger(__name__)
BUNDLED = Path(__file__).parent / "resources" / "tiny-llava"


def tokenizer_texts(train_captions: list[str]) -> list[str]:
    """What the tiny LLaVA's tokenizer learns from besides its pretraining captions."""
    return [*train_captions, INSTRUCTION, "USER: ASSISTANT:"]


def ensure_base_model(cfg: Config, train_captions: list[str], wait: bool = False,
                      bundled: Path | None = BUNDLED) -> Path:
    """Put the tiny demo teacher at ``teacher.model`` if configured and missing or built with other settings: a copy
    of ``bundled`` when it was built with the same settings, else built here (rank 0 holding the folder's lock, other
    ranks wait for it). Any other checkpoint there is used as it is."""
    from pipeline.demo.tiny_llava import build_tiny_llava, built_with, is_current, tiny_settings

    path, tiny = cfg.teacher.model, cfg.teacher.tiny
    if tiny is None:
        return path
    pretraining_root = cfg.data.pretraining.root if cfg.data.pretraining else None
    texts = tokenizer_texts(train_captions)
    settings = tiny_settings(tiny, cfg.seed, pretraining_root, texts)
    if is_current(path, settings):
        return path
    if rank() == 0:
        with output_lock(path, wait=wait):
            if is_current(path, settings):  # built meanwhile by a run that held the lock
                return path
            if bundled is not None and built_with(bundled, settings):
                with publish_dir(path) as tmp:
                    for f in sorted(bundled.iterdir()):
                        if f.is_file():
                            shutil.copyfile(f, tmp / f.name)
                log.info("tiny LLaVA: the bundled pretrained base (%s) copied to %s", bundled, path)
            else:
                build_tiny_llava(path, tiny, texts, seed=cfg.seed, pretraining_root=pretraining_root)
    else:
        while not is_current(path, settings):
            time.sleep(1)
    return path
