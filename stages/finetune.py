"""`finetune`: LoRA fine-tune the LLaVA teacher on the prepared train split (multi-GPU via deepspeed/torchrun).

Outputs in ``<run_dir>/teacher/``: ``adapter/`` (LoRA + projector, safetensors, with the processor), ``merged/``
(optional, llava-hf layout), ``checkpoints/`` (trainer state, for resume), ``tensorboard/``,
``eval_generations.json`` (captions of held-out images before/after) and ``manifest.json`` (last).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from pipeline import depends
from pipeline.config import Config
from pipeline.data.formats import INSTRUCTION, load_captions, split_rows
from pipeline.rundir import (RunDir, atomic_write_json, is_up_to_date, output_lock, require_stage, reset_work_dir,
                             wait_for_work_dir, write_manifest)
from stages.cli import claims, stage_main, waits

log = logging.getLogger("finetune")


def rank() -> int:
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


def caption_quality(cfg: Config, rows: list[dict], adapter: Path | None) -> dict:
    """Greedy captions for held-out images and their BLEU-4 / CIDEr-D against the ground truth."""
    from pipeline.data.images import load_rgb
    from pipeline.metrics import CaptionScorer
    from pipeline.teacher.generate import generate_captions
    from pipeline.teacher.loading import load_processor, load_teacher

    processor = load_processor(adapter or cfg.teacher.model)
    model = load_teacher(cfg.teacher.model, adapter, precision=cfg.teacher.precision,
                         attn_implementation=cfg.teacher.attn_implementation, merge=True)
    captions: dict[str, str] = {}
    bs = cfg.teacher.train.per_device_batch_size
    for i in range(0, len(rows), bs):
        chunk = rows[i: i + bs]
        images = [load_rgb(r["image_path"]) for r in chunk]
        gens = generate_captions(model, processor, images, [r["image_id"] for r in chunk], seed=cfg.seed,
                                 temperature=0.0, top_p=1.0,
                                 max_new_tokens=cfg.teacher.train.eval_max_new_tokens)
        captions.update({r["image_id"]: g.caption for r, g in zip(chunk, gens)})
    with CaptionScorer(meteor=False) as scorer:
        scores = scorer.score({r["image_id"]: [r["caption"]] for r in rows}, captions)
    return {"BLEU-4": scores["BLEU-4"], "CIDEr-D": scores["CIDEr-D"], "captions": captions}


def merge_adapter(cfg: Config, adapter: Path, out: Path) -> None:
    from pipeline.rundir import publish_dir
    from pipeline.teacher.loading import load_processor, load_teacher

    model = load_teacher(cfg.teacher.model, adapter, precision=cfg.teacher.precision)
    merged = model.merge_and_unload()
    with publish_dir(out) as tmp:
        merged.save_pretrained(tmp)
        load_processor(adapter).save_pretrained(tmp)


@claims(lambda cfg, args: RunDir(cfg.run_dir).teacher if rank() == 0 else None)  # other ranks follow rank 0
def run(cfg: Config, args: argparse.Namespace) -> Path:
    from pipeline.teacher.train import finetune

    started = time.time()
    rd = RunDir(cfg.run_dir)
    require_stage(rd.data, "prepare")
    data = load_captions(rd.data / "captions")
    train_rows, val_rows = split_rows(data, "train"), split_rows(data, "val")
    ensure_base_model(cfg, [r["caption"] for r in train_rows], waits(args))
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
        merge_adapter(cfg, out / "adapter", out / "merged")
    write_manifest(out, stage="finetune", config=config, inputs=inputs, started=started, seed=cfg.seed,
                   figures=figures)
    log.info("teacher: eval loss %s -> %s; held-out generation %s", figures["first_eval_loss"],
             figures["final_eval_loss"], figures.get("held_out_generation"))
    return out


if __name__ == "__main__":
    sys.exit(stage_main("finetune", run))
