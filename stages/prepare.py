"""`prepare`: raw DeepFashion-MultiModal (real or DeepFashion-lite) -> validated caption dataset + exports.

Outputs in ``<run_dir>/data/``: ``captions/`` (HF datasets, splits train/val/test), ``llava_train.json``,
``karpathy.json``, ``stats.json``, ``skipped.json`` and ``manifest.json`` (last). The folder is published in one
rename, so a killed run never leaves a readable partial output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from pipeline import depends
from pipeline.config import Config
from pipeline.data import synthetic
from pipeline.data.deepfashion import IMAGE_DIR, DataError, detect_layout, problems_as_dicts, read_dataset
from pipeline.data.formats import caption_stats, karpathy_json, llava_conversations, to_hf_dataset
from pipeline.rundir import (RunDir, atomic_write_json, foreign_entry, is_up_to_date, output_lock, publish_dir,
                             write_manifest)
from stages.cli import claims, stage_main, waits

log = logging.getLogger("prepare")


def ensure_raw_data(cfg: Config, wait: bool = False) -> None:
    """Generate DeepFashion-lite into ``data.root`` when configured and the folder is missing (or empty, or one it
    generated with other settings). Any other existing folder is the dataset, read as it is."""
    syn, root = cfg.data.synthetic, cfg.data.root
    if syn is None:
        return
    with output_lock(root, wait=wait):
        wanted = {"dataset": "DeepFashion-lite", "seed": cfg.seed, **syn.model_dump(mode="json")}
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


@claims(lambda cfg, args: RunDir(cfg.run_dir).data)
def run(cfg: Config, args: argparse.Namespace) -> Path:
    started = time.time()
    rd = RunDir(cfg.run_dir)
    ensure_raw_data(cfg, waits(args))
    ensure_pretraining_images(cfg, waits(args))
    layout = detect_layout(cfg.data.root, cfg.data.layout)
    config, inputs = depends.prepare(cfg)
    if not args.force and is_up_to_date(rd.data, config, inputs):
        log.info("%s is up to date (use --force to rerun)", rd.data)
        return rd.data

    records, problems = read_dataset(cfg.data.root, layout, seed=cfg.seed, test_fraction=cfg.data.split.test,
                                     val_fraction=cfg.data.split.val, check_images=cfg.data.check_images,
                                     workers=cfg.data.workers)
    if problems and cfg.data.on_bad_record == "fail":
        p = problems[0]
        raise DataError(f"{cfg.data.root / p.file}: record {p.record!r}: {p.reason} "
                        f"({len(problems)} bad record(s); data.on_bad_record=skip skips them with a report)")
    if not records:
        raise DataError(f"{cfg.data.root}: no valid records ({len(problems)} rejected)")
    for p in problems[:10]:
        log.warning("skipped %s: %s", p.record, p.reason)
    if len(problems) > 10:
        log.warning("... %d more skipped records, all listed in skipped.json", len(problems) - 10)

    rows = [{**asdict(r), "source": "gt"} for r in records]
    stats = caption_stats(rows)
    stats["layout"] = layout
    stats["skipped"] = len(problems)
    image_folder = Path(os.path.abspath(cfg.data.root / IMAGE_DIR))  # symlinks kept: paths as the dataset names them
    with publish_dir(rd.data) as tmp:
        to_hf_dataset(rows).save_to_disk(str(tmp / "captions"))
        train = [r for r in rows if r["split"] == "train"]
        atomic_write_json(tmp / "llava_train.json", llava_conversations(train, image_folder))
        atomic_write_json(tmp / "karpathy.json", karpathy_json(rows))
        atomic_write_json(tmp / "stats.json", stats)
        atomic_write_json(tmp / "skipped.json", problems_as_dicts(problems))
        write_manifest(tmp, stage="prepare", config=config, inputs=inputs, started=started, seed=cfg.seed,
                       figures={"counts": stats["counts"], "skipped": len(problems),
                                "image_folder": str(image_folder)})
    log.info("%s -> %s (train %d, val %d, test %d; %d skipped)", cfg.data.root, rd.data,
             *(stats["counts"][s] for s in ("train", "val", "test")), len(problems))
    return rd.data


if __name__ == "__main__":
    sys.exit(stage_main("prepare", run))
