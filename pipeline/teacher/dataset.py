"""A distilled caption dataset: the fine-tuned teacher's generations (in shards) joined into the captions schema.

:func:`distill_dataset` writes ``<run_dir>/distill/<name>/``: the generation JSONL of each shard (resumable), and
once every shard is there ``captions/`` (train/val from the teacher with ``source=<name>``, test copied from the
ground truth), ``meta.json``, ``diagnostics.json``, ``rejected.json``, ``test_generations.json``, ``README.md``
(dataset card) and ``manifest.json`` (last).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline import depends
from pipeline.attribute_metrics import attribute_accuracy, majority_baseline
from pipeline.cards import dataset_card
from pipeline.config import Config
from pipeline.data.diagnostics import caption_diagnostics
from pipeline.data.formats import load_captions, split_rows, to_hf_dataset
from pipeline.errors import PipelineError
from pipeline.metrics import CaptionScorer
from pipeline.rundir import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    claim_output,
    is_stale_work,
    is_up_to_date,
    publish_dir,
    reset_work_dir,
    write_manifest,
)
from pipeline.teacher.distill import generate_shard, read_generations, shard_count, shard_file
from pipeline.teacher.loading import finetuned_teacher

log = logging.getLogger(__name__)


def distill_dataset(cfg: Config, *, shard: tuple[int, int] = (0, 1), merge: bool = False, reset: bool = False,
                    force: bool = False, wait: bool = False) -> Path:
    """Distil ``cfg.distill.dataset_name``: generate shard ``(i, n)`` of the train, val and test images, then (with
    one shard, or ``merge`` once every shard has finished) join them into the dataset. ``reset`` only makes the work
    folder ready for these settings (once before parallel shards start). Holds the output's lock, or its shard's,
    while it runs; ``wait`` waits for another holder instead of failing. Returns the output folder."""
    i, n = shard
    rd = RunDir(cfg.run_dir)
    out = rd.distill(cfg.distill.dataset_name)
    with claim_output(out, part=f"shard-{i}-of-{n}" if n > 1 and not merge else "", wait=wait):
        started = time.time()
        config, inputs = depends.distill(cfg, rd)
        teacher = finetuned_teacher(cfg.teacher.model, rd.teacher)
        if not force and is_up_to_date(out, config, inputs):
            log.info("%s is up to date (use --force to rerun)", out)
            return out
        if reset:
            reset_work_dir(out, config, inputs, force=force)
            return out
        if not merge:
            if n > 1 and not force and is_stale_work(out, config, inputs):
                raise PipelineError(f"{out} holds generations from other settings; rerun with --force on one shard "
                                    "first or delete the folder")
            reset_work_dir(out, config, inputs, force=force)  # other settings: old generations are invalid
        data = load_captions(rd.data / "captions")
        rows, test_rows = split_rows(data, "train") + split_rows(data, "val"), split_rows(data, "test")
        throughput = None
        if merge:
            n = shard_count(out)
        else:  # the test images too: not part of the dataset, but the teacher's own test score and the gallery
            throughput = generate_shard(cfg, rows + test_rows, out, shard=(i, n), model_dir=teacher[0],
                                        adapter=teacher[1])
            if n > 1:
                log.info("shard %d/%d done; run with --merge once every shard has finished", i, n)
                return out
        return merge_shards(cfg, out, rows=rows, test_rows=test_rows, shards=n, teacher=teacher, config=config,
                            inputs=inputs, started=started, throughput=throughput)


def merge_shards(cfg: Config, out: Path, *, rows: list[dict], test_rows: list[dict], shards: int,
                 teacher: tuple[Path, Path | None], config: dict[str, Any], inputs: dict[str, str], started: float,
                 throughput: dict | None) -> Path:
    """Join the ``shards`` generation files in ``out`` into the dataset of ``rows`` (train and val) and the
    teacher's test captions of ``test_rows``, with diagnostics and card; the manifest last."""
    name = cfg.distill.dataset_name
    generations: dict[str, dict] = {}
    for i in range(shards):
        generations.update(read_generations(shard_file(out, i, shards)))
    missing = [r["image_id"] for r in rows + test_rows if r["image_id"] not in generations]
    if missing:
        raise PipelineError(f"{out}: {len(missing)} images have no generation yet (e.g. {missing[:3]}); run the "
                            f"missing shards of {shards} first")
    kept, rejected = [], []
    for r in rows:
        g = generations[r["image_id"]]
        if not g["caption"]:
            rejected.append({"image_id": r["image_id"], "reason": "empty"})
        elif g["truncated"]:
            rejected.append({"image_id": r["image_id"], "reason": f"truncated at {g['num_tokens']} tokens "
                                                                  f"(distill.max_new_tokens)"})
        else:
            kept.append({**r, "caption": g["caption"], "source": name})
    if not kept:
        raise PipelineError(f"{out}: every generation was empty or truncated; see rejected reasons")
    diag = caption_diagnostics([r["caption"] for r in kept])
    gt = caption_diagnostics([r["caption"] for r in rows])
    diag.update({"share_empty": sum(x["reason"] == "empty" for x in rejected) / len(rows),
                 "share_truncated": sum(x["reason"] != "empty" for x in rejected) / len(rows)})
    with CaptionScorer(meteor=False) as scorer:
        agree = scorer.score({r["image_id"]: [r["caption"]] for r in rows},
                             {r["image_id"]: generations[r["image_id"]]["caption"] for r in rows})
        teacher_test = scorer.score({r["image_id"]: [r["caption"]] for r in test_rows},
                                    {r["image_id"]: generations[r["image_id"]]["caption"] for r in test_rows})
    diag["vs_ground_truth"] = {"BLEU-4": agree["BLEU-4"], "CIDEr-D": agree["CIDEr-D"],
                               "attributes": _attributes(rows, generations)}
    diag["teacher_on_test"] = {**teacher_test, "attributes": _attributes(test_rows, generations)}
    diag["majority_attributes"] = majority_baseline([r["caption"] for r in rows if r["split"] == "train"],
                                                    {r["image_id"]: r["caption"] for r in test_rows})
    diag["ground_truth"] = gt
    model_dir, adapter = teacher
    meta = {**config, "teacher_fingerprint": inputs["teacher"], "teacher_dir": str(RunDir(cfg.run_dir).teacher),
            "teacher_model": str(model_dir), "adapter": adapter and str(adapter), "shards": shards,
            "throughput": throughput}
    with publish_dir(out / "captions") as tmp:
        to_hf_dataset(kept + test_rows).save_to_disk(str(tmp))
    atomic_write_json(out / "meta.json", meta)
    atomic_write_json(out / "diagnostics.json", diag)
    atomic_write_json(out / "rejected.json", rejected)
    atomic_write_json(out / "test_generations.json", {r["image_id"]: generations[r["image_id"]]["caption"]
                                                      for r in test_rows})
    atomic_write_text(out / "README.md", dataset_card(name=name, meta=meta, diagnostics=diag, rejected=len(rejected),
                                                      counts=Counter(r["split"] for r in kept + test_rows)))
    write_manifest(out, stage="distill", config=config, inputs=inputs, started=started, seed=cfg.seed,
                   figures={"kept": len(kept), "rejected": len(rejected), **{k: diag[k] for k in (
                       "length_mean", "distinct_1", "distinct_2", "vocabulary")},
                       "attributes_vs_ground_truth": diag["vs_ground_truth"]["attributes"]["macro"]})
    log.info("%s (T=%s): %d captions, %d rejected; mean length %.1f words, distinct-2 %.3f, BLEU-4 vs GT %.3f; "
             "attributes vs GT: train+val %.3f, test %.3f (majority %.3f)", name, cfg.distill.temperature, len(kept),
             len(rejected), diag["length_mean"], diag["distinct_2"], agree["BLEU-4"],
             diag["vs_ground_truth"]["attributes"]["macro"], diag["teacher_on_test"]["attributes"]["macro"],
             diag["majority_attributes"]["macro"])
    return out


def _attributes(rows: list[dict], generations: dict[str, dict]) -> dict:
    """Attribute accuracy of the teacher's captions of ``rows``' images against their ground truth."""
    return attribute_accuracy({r["image_id"]: r["caption"] for r in rows},
                              {r["image_id"]: generations[r["image_id"]]["caption"] for r in rows})
