"""`finetune`: LoRA fine-tune the LLaVA teacher on the prepared train split (multi-GPU via deepspeed/torchrun).

Outputs in ``<run_dir>/teacher/``: ``adapter/`` (LoRA + projector, safetensors, with the processor), ``merged/``
(optional, llava-hf layout), ``checkpoints/`` (trainer state, for resume), ``tensorboard/``,
``eval_generations.json`` (captions of held-out images before/after) and ``manifest.json`` (last).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.cpus import rank
from pipeline.core.rundir import (
    RunDir,
    atomic_write_json,
    is_up_to_date,
    require_stage,
    reset_work_dir,
    wait_for_work_dir,
    write_manifest,
)
from pipeline.data.formats import load_captions, split_rows
from pipeline.demo.base_model import ensure_base_model
from pipeline.workflows import depends
from pipeline.workflows.preflight import require_inputs
from stages.cli import claims, stage_main, waits

log = logging.getLogger("finetune")


@claims(lambda cfg, args: RunDir(cfg.run_dir).teacher if rank() == 0 else None)  # other ranks follow rank 0
def run(cfg: Config, args: argparse.Namespace) -> Path:
    from pipeline.teacher.loading import merge_adapter
    from pipeline.teacher.quality import caption_quality
    from pipeline.teacher.train import finetune

    started = time.time()
    rd = RunDir(cfg.run_dir)
    require_stage(rd.data, "prepare")
    data = load_captions(rd.data / "captions")
    train_rows, val_rows = split_rows(data, "train"), split_rows(data, "val")
    ensure_base_model(cfg, [r["caption"] for r in train_rows], waits(args))
    require_inputs(cfg, "finetune")
    config, inputs = depends.finetune(cfg, rd)
    if not args.force and is_up_to_date(rd.teacher, config, inputs):
        log.info("%s is up to date (use --force to rerun)", rd.teacher)
        return rd.teacher

    out = rd.teacher
    if rank() == 0:  # a fresh start wipes stale checkpoints, which would be resumed otherwise
        reset_work_dir(out, config, inputs, force=args.force)
    else:
        wait_for_work_dir(out, config, inputs)

    figures = finetune(cfg.teacher, train_rows, val_rows, out, cfg.seed)
    if not figures.pop("is_main_process"):
        return out
    held_out = val_rows[: cfg.teacher.train.eval_generation_samples]
    if held_out:
        before = caption_quality(cfg, held_out, None)
        after = caption_quality(cfg, held_out, out / "adapter")
        atomic_write_json(out / "eval_generations.json", [
            {"image_id": r["image_id"], "ground_truth": r["caption"], "untrained": before["captions"][r["image_id"]],
             "finetuned": after["captions"][r["image_id"]]} for r in held_out])
        figures["held_out_generation"] = {
            "images": len(held_out),
            "untrained": {k: before[k] for k in ("BLEU-4", "CIDEr-D")},
            "finetuned": {k: after[k] for k in ("BLEU-4", "CIDEr-D")},
        }
    if cfg.teacher.train.merge:
        merge_adapter(cfg.teacher.model, out / "adapter", out / "merged", precision=cfg.teacher.precision)
    write_manifest(out, stage="finetune", config=config, inputs=inputs, started=started, seed=cfg.seed,
                   figures=figures)
    log.info("teacher: eval loss %s -> %s; held-out generation %s", figures["first_eval_loss"],
             figures["final_eval_loss"], figures.get("held_out_generation"))
    return out


if __name__ == "__main__":
    sys.exit(stage_main("finetune", run))
