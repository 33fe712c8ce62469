"""The raw datasets a run reads: DeepFashion-lite at ``data.root`` and the pretraining stand-ins' images, generated
when configured and missing; any other dataset already there is read as it is."""

from __future__ import annotations

import json
import logging

from pipeline.core.config import Config, ConfigError
from pipeline.core.rundir import foreign_entry, output_lock
from pipeline.demo import synthetic

log = logging.getLogger(__name__)


def ensure_raw_data(cfg: Config, wait: bool = False) -> None:
    """Generate DeepFashion-lite into ``data.root`` when configured and the folder is missing (or empty, or one it
    generated with other settings). Any other existing folder is the dataset, read as it is."""
    syn, root = cfg.data.synthetic, cfg.data.root
    if syn is None:
        return
    with output_lock(root, wait=wait):
        wanted = synthetic.dataset_settings(syn, cfg.seed)
        if root.is_dir() and any(root.iterdir()):
            readme = root / "README.json"
            if foreign_entry(root) is not None or not readme.is_file():
                log.info("reading the existing dataset at data.root %s (data.synthetic generates only into a "
                         "missing folder)", root)
                return
            have = json.loads(readme.read_text())
            if {k: have.get(k) for k in wanted} == wanted:
                return
            log.info("DeepFashion-lite settings changed; regenerating %s", root)
        synthetic.generate(root, syn, cfg.seed, workers=cfg.data.workers)


def ensure_pretraining_images(cfg: Config, wait: bool = False) -> None:
    """Render the pretraining stand-ins' images (captions in no split of ``data.root``) when configured."""
    pre = cfg.data.pretraining
    if pre is None:
        return
    with output_lock(pre.root, wait=wait):
        synthetic.generate_held_out(pre.root, "pretraining", pre.images, cfg.data.synthetic, cfg.seed,
                                    synthetic.dataset_names(cfg.data.root), workers=cfg.data.workers)


def ensure_unlabeled_pool(cfg: Config, wait: bool = True) -> None:
    """Render the demo's unlabelled pool (``data.unlabeled_pool``: captions in no split of ``data.root`` and not
    among the pretraining images) when configured; the pretraining images first, which it must avoid."""
    pool = cfg.data.unlabeled_pool
    if pool is None:
        return
    if cfg.data.synthetic is None:
        raise ConfigError("data.unlabeled_pool renders images: it needs data.synthetic")
    ensure_pretraining_images(cfg, wait)
    exclude = synthetic.dataset_names(cfg.data.root)
    if cfg.data.pretraining is not None:
        exclude |= synthetic.dataset_names(cfg.data.pretraining.root)
    with output_lock(pool.root, wait=wait):
        synthetic.generate_held_out(pool.root, "unlabeled_pool", pool.images, cfg.data.synthetic, cfg.seed, exclude,
                                    workers=cfg.data.workers)
