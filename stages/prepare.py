"""`prepare`: raw DeepFashion-MultiModal (real or DeepFashion-lite) -> validated caption dataset + exports.

Outputs in ``<run_dir>/data/``: ``captions/`` (HF datasets, splits train/val/test), ``llava_train.json``,
``karpathy.json``, ``stats.json``, ``skipped.json`` and ``manifest.json`` (last). The folder is published in one
rename, so a killed run never leaves a readable partial output.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.rundir import RunDir, atomic_write_json, is_up_to_date, publish_dir, write_manifest
from pipeline.data.deepfashion import IMAGE_DIR, DataError, detect_layout, problems_as_dicts, read_dataset
from pipeline.data.formats import caption_stats, karpathy_json, llava_conversations, save_captions, to_hf_dataset
from pipeline.demo.raw import ensure_pretraining_images, ensure_raw_data
from pipeline.workflows import depends
from stages.cli import claims, stage_main, waits

log = logging.getLogger("prepare")


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
        save_captions(to_hf_dataset(rows), tmp / "captions")
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
