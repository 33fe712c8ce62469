"""The base checkpoint the teacher fine-tunes: used as it is, or the demo's tiny LLaVA built where it is missing."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.config import Config
from pipeline.data.formats import INSTRUCTION
from pipeline.rundir import output_lock


def rank() -> int:
    """This process's rank in a distributed launch (0 when launched alone)."""
    return int(os.environ.get("RANK", "0"))


def ensure_base_model(cfg: Config, train_captions: list[str], wait: bool = False) -> Path:
    """Build the tiny demo teacher at ``teacher.model`` if configured and missing or built with other settings (rank
    0 builds holding the folder's lock, other ranks wait for it). Any other checkpoint there is used as it is."""
    from pipeline.teacher.tiny import build_tiny_llava, is_current, tiny_settings

    path, tiny = cfg.teacher.model, cfg.teacher.tiny
    if tiny is None:
        return path
    pretraining_root = cfg.data.pretraining.root if cfg.data.pretraining else None
    settings = tiny_settings(tiny, cfg.seed, pretraining_root)
    if is_current(path, settings):
        return path
    if rank() == 0:
        with output_lock(path, wait=wait):
            if not is_current(path, settings):  # not built meanwhile by a run that held the lock
                build_tiny_llava(path, tiny, train_captions + [INSTRUCTION, "USER: ASSISTANT:"], seed=cfg.seed,
                                 pretraining_root=pretraining_root)
    else:
        while not is_current(path, settings):
            time.sleep(1)
    return path
