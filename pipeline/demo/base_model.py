"""The base checkpoint the teacher fine-tunes: used as it is, or the demo's tiny LLaVA built where it is missing."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.cpus import rank
from pipeline.core.rundir import output_lock
from pipeline.data.formats import INSTRUCTION


def ensure_base_model(cfg: Config, train_captions: list[str], wait: bool = False) -> Path:
    """Build the tiny demo teacher at ``teacher.model`` if configured and missing or built with other settings (rank
    0 builds holding the folder's lock, other ranks wait for it). Any other checkpoint there is used as it is."""
    from pipeline.demo.tiny_llava import build_tiny_llava, is_current, tiny_settings

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
