"""`distill`: the fine-tuned teacher captions every train and val image at one temperature.

``make distill TEMP=0.2 [NAME=precise]``. Output in ``<run_dir>/distill/<name>/``: ``generations[.shard-i-of-n]
.jsonl`` (resumable), ``captions/`` (same schema as `prepare`'s; train/val from the teacher with
``source=<name>``, test copied unchanged from the ground truth), ``meta.json``, ``diagnostics.json``,
``rejected.json`` (empty / truncated generations), ``test_generations.json`` (the teacher's captions of the test
images, for its own test score and the report's gallery; never trained on), ``README.md`` (dataset card) and
``manifest.json`` (last).
Sharding: ``--shard i/n`` (or a Slurm array) generates a disjoint slice; ``--merge`` joins finished shards.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

from pipeline.attribute_metrics import attribute_accuracy, majority_baseline
from pipeline import depends
from pipeline.cards import dataset_card
from pipeline.config import Config
from pipeline.data.diagnostics import caption_diagnostics
from pipeline.data.formats import load_captions, split_rows, to_hf_dataset
from pipeline.errors import PipelineError
from pipeline.rundir import (RunDir, atomic_write_json, atomic_write_text, is_stale_work, is_up_to_date, publish_dir,
                             reset_work_dir, write_manifest)
from pipeline.teacher.loading import finetuned_teacher
from stages.cli import claims, stage_main

log = logging.getLogger("distill")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard", default=None, help="i/n: generate only slice i of n (default: Slurm array or 0/1)")
    parser.add_argument("--merge", action="store_true", help="only join the finished shards into the dataset")
    parser.add_argument("--reset", action="store_true", help="only make the work folder ready for these settings "
                        "(wiped with --force or when made with others), once before parallel shards start")


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        if "SLURM_ARRAY_TASK_ID" in os.environ:
            return int(os.environ["SLURM_ARRAY_TASK_ID"]), int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise PipelineError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise PipelineError(f"--shard {text}: i must be in [0, {n})")
    return i, n


def shard_file(out: Path, i: int, n: int) -> Path:
    return out / ("generations.jsonl" if n == 1 else f"generations.shard-{i}-of-{n}.jsonl")


def shard_count(out: Path) -> int:
    """How many shards the generation files in ``out`` were written for (1 when unsharded)."""
    counts = {int(p.name.rsplit("-of-", 1)[1].split(".")[0]) for p in out.glob("generations.shard-*-of-*.jsonl")}
    if len(counts) > 1:
        raise PipelineError(f"{out}: generation shards for different shard counts {sorted(counts)}; rerun with --force")
    return counts.pop() if counts else 1


def teacher_paths(cfg: Config, rd: RunDir) -> tuple[Path, Path | None]:
    """(model folder, adapter folder or None): the merged model when finetune wrote one, else adapter on base."""
    return finetuned_teacher(cfg.teacher.model, rd.teacher)


def generate_shard(cfg: Config, rows: list[dict], out: Path, i: int, n: int, model_dir: Path,
                   adapter: Path | None) -> dict:
    from pipeline.teacher.distill import generate_to_jsonl, shard_rows
    from pipeline.teacher.loading import load_processor, load_teacher

    d = cfg.distill
    processor = load_processor(adapter or model_dir)
    model = load_teacher(model_dir, adapter, precision=cfg.teacher.precision,
                         attn_implementation=cfg.teacher.attn_implementation,
                         device_map="auto" if _cuda() else None, merge=True)
    return generate_to_jsonl(model, processor, shard_rows(rows, i, n), shard_file(out, i, n), seed=cfg.seed,
                             temperature=d.temperature, top_p=d.top_p, max_new_tokens=d.max_new_tokens,
                             batch_size=d.batch_size, desc=f"distill {d.dataset_name} T={d.temperature}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def merge(cfg: Config, rd: RunDir, out: Path, rows: list[dict], test_rows: list[dict], n: int, config: dict,
          inputs: dict, started: float, throughput: dict | None) -> Path:
    from pipeline.metrics import CaptionScorer
    from pipeline.teacher.distill import read_generations

    name = cfg.distill.dataset_name
    generations: dict[str, dict] = {}
    for i in range(n):
        generations.update(read_generations(shard_file(out, i, n)))
    missing = [r["image_id"] for r in rows + test_rows if r["image_id"] not in generations]
    if missing:
        raise PipelineError(f"{out}: {len(missing)} images have no generation yet (e.g. {missing[:3]}); run the "
                            f"missing shards of {n} first")
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
    model_dir, adapter = teacher_paths(cfg, rd)
    meta = {**config, "teacher_fingerprint": inputs["teacher"], "teacher_dir": str(rd.teacher),
            "teacher_model": str(model_dir), "adapter": adapter and str(adapter), "shards": n, "throughput": throughput}
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


def shard_part(cfg: Config, args: argparse.Namespace) -> str:
    """The part of the output a run locks: its shard (so different shards run in parallel), else the whole."""
    i, n = parse_shard(getattr(args, "shard", None))
    return f"shard-{i}-of-{n}" if n > 1 and not getattr(args, "merge", False) else ""


@claims(lambda cfg, args: RunDir(cfg.run_dir).distill(cfg.distill.dataset_name), part=shard_part)
def run(cfg: Config, args: argparse.Namespace) -> Path:
    started = time.time()
    rd = RunDir(cfg.run_dir)
    config, inputs = depends.distill(cfg, rd)
    model_dir, adapter = teacher_paths(cfg, rd)
    out = rd.distill(cfg.distill.dataset_name)
    if not args.force and is_up_to_date(out, config, inputs):
        log.info("%s is up to date (use --force to rerun)", out)
        return out
    if getattr(args, "reset", False):
        reset_work_dir(out, config, inputs, force=args.force)
        return out
    i, n = parse_shard(getattr(args, "shard", None))
    merging = getattr(args, "merge", False)
    if not merging:
        if n > 1 and not args.force and is_stale_work(out, config, inputs):
            raise PipelineError(f"{out} holds generations from other settings; rerun with --force on one shard "
                                "first or delete the folder")
        reset_work_dir(out, config, inputs, force=args.force)  # other settings: old generations are invalid
    data = load_captions(rd.data / "captions")
    rows, test_rows = split_rows(data, "train") + split_rows(data, "val"), split_rows(data, "test")
    throughput = None
    if merging:
        n = shard_count(out)
    else:  # the test images too: not part of the dataset, but the teacher's own test score and the gallery
        throughput = generate_shard(cfg, rows + test_rows, out, i, n, model_dir, adapter)
        if n > 1:
            log.info("shard %d/%d done; run with --merge once every shard has finished", i, n)
            return out
    return merge(cfg, rd, out, rows, test_rows, n, config, inputs, started, throughput)


if __name__ == "__main__":
    sys.exit(stage_main("distill", run, add_args))
