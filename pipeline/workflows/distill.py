"""A distilled caption dataset: the fine-tuned teacher's generations (in shards) joined into the captions schema.

:func:`distill_dataset` writes ``<run_dir>/distill/<name>/``: the generation JSONL of each shard (resumable), and
once every shard is there ``captions/`` (train/val from the teacher with ``source=<name>``, test copied from the
ground truth), ``meta.json``, ``diagnostics.json``, ``rejected.json``, ``test_generations.json``, ``README.md``
(dataset card) and ``manifest.json`` (last).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.core.config import Config
from pipeline.core.errors import PipelineError
from pipeline.core.rundir import (
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
from pipeline.data.deepfashion import IMAGE_DIR, describe_dataset
from pipeline.data.diagnostics import caption_diagnostics
from pipeline.data.formats import (
    DISTILL_COLUMNS,
    ORIGIN_DATASET,
    ORIGIN_UNLABELED,
    load_captions,
    save_captions,
    split_rows,
    to_hf_dataset,
)
from pipeline.demo.raw import ensure_unlabeled_pool
from pipeline.evaluation.attributes import attribute_accuracy, majority_baseline
from pipeline.evaluation.metrics import CaptionScorer
from pipeline.reporting.cards import dataset_card
from pipeline.teacher.distill import Key, generate_shard, read_generations, shard_count, shard_file, skipped_images
from pipeline.teacher.loading import finetuned_teacher
from pipeline.teacher.unlabeled import DatasetImages, unlabeled_rows
from pipeline.workflows import depends

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
        if uses_unlabeled_pool(cfg):
            ensure_unlabeled_pool(cfg)
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
        unlabeled = unlabeled_rows(cfg.distill.unlabeled) if cfg.distill.unlabeled is not None else []
        throughput = None
        if merge:
            n = shard_count(out)
        else:  # the test images too: not part of the dataset, but the teacher's own test score and the gallery
            k = cfg.distill.samples_per_image
            todo = [{**r, "samples": k} for r in rows + unlabeled] + [{**r, "samples": 1} for r in test_rows]
            throughput = generate_shard(cfg, todo, out, shard=(i, n), teacher_dir=rd.teacher,
                                        dataset=DatasetImages.of(rows + test_rows) if unlabeled else None)
            if n > 1:
                log.info("shard %d/%d done; run with --merge once every shard has finished", i, n)
                return out
        return merge_shards(cfg, out, rows=rows, unlabeled=unlabeled, test_rows=test_rows, shards=n,
                            teacher=teacher, config=config, inputs=inputs, started=started, throughput=throughput)


def uses_unlabeled_pool(cfg: Config) -> bool:
    """Whether ``distill.unlabeled`` is the images folder of the configured (rendered) ``data.unlabeled_pool``."""
    pool, folder = cfg.data.unlabeled_pool, cfg.distill.unlabeled
    return pool is not None and folder is not None and \
        Path(os.path.abspath(folder)) == Path(os.path.abspath(pool.root)) / IMAGE_DIR


def _read_all(out: Path, shards: int, expected: list[tuple[dict, int]]) -> dict[Key, dict]:
    """Every shard's generations; one line naming the first missing (image, sample) when one is not there yet."""
    generations: dict[Key, dict] = {}
    for i in range(shards):
        generations.update(read_generations(shard_file(out, i, shards)))
    missing = [key for key in ((r["image_id"], j) for r, j in expected) if key not in generations]
    if missing:
        raise PipelineError(f"{out}: {len(missing)} (image, sample) pairs have no generation yet (e.g. "
                            f"{missing[:3]}); run the missing shards of {shards} first")
    return generations


def _row_samples(rows: list[dict], k: int, skipped: dict[str, str]) -> list[tuple[dict, int]]:
    return [(r, j) for r in rows if r["image_id"] not in skipped for j in range(k)]


def _keep_or_reject(samples: list[tuple[dict, int]], generations: dict[Key, dict], name: str
                    ) -> tuple[list[dict], list[dict]]:
    """The dataset rows of the usable generations and a reason for each empty or truncated one."""
    kept, rejected = [], []
    for r, j in samples:
        g = generations[(r["image_id"], j)]
        if not g["caption"]:
            rejected.append({"image_id": r["image_id"], "sample": j, "reason": "empty"})
        elif g["truncated"]:
            rejected.append({"image_id": r["image_id"], "sample": j, "reason": f"truncated at {g['num_tokens']} "
                                                                               "tokens (distill.max_new_tokens)"})
        else:
            kept.append({**r, "caption": g["caption"], "source": name, "sample": j,
                         "origin": r.get("origin", ORIGIN_DATASET)})
    return kept, rejected


def merge_shards(cfg: Config, out: Path, *, rows: list[dict], unlabeled: list[dict], test_rows: list[dict],
                 shards: int, teacher: tuple[Path, Path | None], config: dict[str, Any], inputs: dict[str, str],
                 started: float, throughput: dict | None) -> Path:
    """Join the ``shards`` generation files in ``out`` into the dataset of ``rows`` (train and val) and the
    ``unlabeled`` rows (train), and the teacher's test captions of ``test_rows``, with diagnostics and card; the
    manifest last. Agreement with the ground truth is measured on each image's sample 0."""
    name, k = cfg.distill.dataset_name, cfg.distill.samples_per_image
    skipped: dict[str, str] = {}
    for i in range(shards):
        skipped.update(skipped_images(read_generations(shard_file(out, i, shards))))
    samples = _row_samples(rows, k, {}) + _row_samples(unlabeled, k, skipped)
    generations = _read_all(out, shards, samples + [(r, 0) for r in test_rows])
    kept, rejected = _keep_or_reject(samples, generations, name)
    if not kept:
        raise PipelineError(f"{out}: every generation was empty or truncated; see rejected reasons")
    diag = caption_diagnostics([r["caption"] for r in kept])
    gt = caption_diagnostics([r["caption"] for r in rows])
    diag.update({"share_empty": sum(x["reason"] == "empty" for x in rejected) / len(samples),
                 "share_truncated": sum(x["reason"] != "empty" for x in rejected) / len(samples),
                 "samples_per_image": k,
                 "unlabeled": {"folder": str(cfg.distill.unlabeled), "images": len(unlabeled),
                               "captioned": len(unlabeled) - len(skipped), "skipped": len(skipped),
                               "captions": sum(r["origin"] == ORIGIN_UNLABELED for r in kept)}
                 if cfg.distill.unlabeled is not None else None})
    first = {r["image_id"]: generations[(r["image_id"], 0)]["caption"] for r in rows + test_rows}
    with CaptionScorer(meteor=False) as scorer:
        agree = scorer.score({r["image_id"]: [r["caption"]] for r in rows}, {r["image_id"]: first[r["image_id"]]
                                                                               for r in rows})
        teacher_test = scorer.score({r["image_id"]: [r["caption"]] for r in test_rows},
                                    {r["image_id"]: first[r["image_id"]] for r in test_rows})
    diag["vs_ground_truth"] = {"BLEU-4": agree["BLEU-4"], "CIDEr-D": agree["CIDEr-D"],
                               "attributes": _attributes(rows, first)}
    diag["teacher_on_test"] = {**teacher_test, "attributes": _attributes(test_rows, first)}
    diag["majority_attributes"] = majority_baseline([r["caption"] for r in rows if r["split"] == "train"],
                                                    {r["image_id"]: r["caption"] for r in test_rows})
    diag["ground_truth"] = gt
    model_dir, adapter = teacher
    meta = {**config, "teacher_fingerprint": inputs["teacher"], "teacher_dir": str(RunDir(cfg.run_dir).teacher),
            "teacher_model": str(model_dir), "adapter": adapter and str(adapter), "shards": shards,
            "engine": depends.engine(cfg), "throughput": throughput}
    test = [{**r, "sample": 0, "origin": ORIGIN_DATASET} for r in test_rows]
    rejected += [{"image_id": r["image_id"], "path": r["image_path"], "reason": skipped[r["image_id"]]}
                 for r in unlabeled if r["image_id"] in skipped]
    with publish_dir(out / "captions") as tmp:
        save_captions(to_hf_dataset(kept + test, DISTILL_COLUMNS), tmp)
    atomic_write_json(out / "meta.json", meta)
    atomic_write_json(out / "diagnostics.json", diag)
    atomic_write_json(out / "rejected.json", rejected)
    atomic_write_json(out / "test_generations.json", {r["image_id"]: first[r["image_id"]] for r in test_rows})
    atomic_write_text(out / "README.md", dataset_card(name=name, meta=meta, diagnostics=diag, rejected=len(rejected),
                                                      counts=Counter(r["split"] for r in kept + test),
                                                      data=describe_dataset(cfg.data.root)))
    write_manifest(out, stage="distill", config=config, inputs=inputs, started=started, seed=cfg.seed,
                   figures={"kept": len(kept), "rejected": len(rejected), "samples_per_image": k,
                            "unlabeled_captions": diag["unlabeled"] and diag["unlabeled"]["captions"],
                            **{key: diag[key] for key in ("length_mean", "distinct_1", "distinct_2", "vocabulary")},
                            "attributes_vs_ground_truth": diag["vs_ground_truth"]["attributes"]["macro"]})
    log.info("%s (T=%s, %d per image): %d captions, %d rejected; mean length %.1f words, distinct-2 %.3f, BLEU-4 "
             "vs GT %.3f; attributes vs GT: train+val %.3f, test %.3f (majority %.3f)", name, cfg.distill.temperature,
             k, len(kept), len(rejected), diag["length_mean"], diag["distinct_2"], agree["BLEU-4"],
             diag["vs_ground_truth"]["attributes"]["macro"], diag["teacher_on_test"]["attributes"]["macro"],
             diag["majority_attributes"]["macro"])
    return out


def _attributes(rows: list[dict], captions: dict[str, str]) -> dict:
    """Attribute accuracy of the teacher's ``captions`` of ``rows``' images against their ground truth."""
    return attribute_accuracy({r["image_id"]: r["caption"] for r in rows}, {r["image_id"]: captions[r["image_id"]]
                                                                           for r in rows})
