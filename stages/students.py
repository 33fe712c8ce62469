"""`students`: train every (architecture x caption source) and score it on the ground-truth test split.

Sources are ``gt`` plus every finished distilled dataset of the run (or ``students.sources``). Output per model in
``<run_dir>/students/<arch>__<source>/``: ``best/`` (safetensors + student.json + vocab.json, and the encoder's
weights when ``students.encoder.finetune``), ``last/`` (resume),
``metrics.json``, ``predictions.jsonl``, ``curves.json``, ``tensorboard/``, ``manifest.json`` (last). Also
``baseline__<source>/metrics.json`` (the most frequent training caption for every test image), ``features/`` (the
frozen encoders' feature cache; a fine-tuned encoder runs in the loop instead) and ``summary.md`` / ``summary.csv``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path


from pipeline.config import Config, config_slice
from pipeline.data.formats import load_captions, split_rows
from pipeline.errors import PipelineError
from pipeline.metrics import METRICS, CaptionScorer
from pipeline.reporting import csv_text, markdown_table
from pipeline.rundir import (RunDir, atomic_write_json, atomic_write_text, claim_output, is_up_to_date,
                             read_manifest, require_stage, reset_work_dir, write_manifest)
from stages.cli import stage_main, waits

log = logging.getLogger("students")
SPLITS = ("train", "val", "test")
TABLE_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def source_dir(rd: RunDir, source: str) -> Path:
    return rd.data if source == "gt" else rd.distill(source)


def resolve_sources(cfg: Config, rd: RunDir) -> list[str]:
    sources = cfg.students.sources or ["gt", *rd.distilled_sources()]
    for s in sources:
        require_stage(source_dir(rd, s), "prepare" if s == "gt" else "distill")
    return sources


def _rows(folder: Path) -> dict[str, list[dict]]:
    data = load_captions(folder / "captions")
    return {s: split_rows(data, s) for s in SPLITS}


def baseline(scorer: CaptionScorer, train_captions: list[str], test_rows: list[dict]) -> dict:
    """Scores of the most frequent training caption used for every test image."""
    caption, count = Counter(train_captions).most_common(1)[0]
    scores = scorer.score({r["image_id"]: [r["caption"]] for r in test_rows}, {r["image_id"]: caption
                                                                              for r in test_rows})
    return {"caption": caption, "train_count": count, "test": scores}


def decoder_inputs(cfg: Config, arch: str, paths: dict[str, list[str]], feature_table):
    """(features, encoder being fine-tuned or None): cached features of the frozen encoder, or the encoder in the
    loop when ``students.encoder.finetune``."""
    from pipeline.students.encoders import ENCODER_OF, build_encoder
    from pipeline.students.features import CachedFeatures, EncoderFeatures

    settings = cfg.students.encoder
    if not settings.finetune:
        return CachedFeatures(arch, *feature_table(arch), paths), None
    encoder = build_encoder(ENCODER_OF[arch], settings, cfg.seed)
    return EncoderFeatures(arch, encoder, settings.image_size, paths, cfg.students.num_workers), encoder


def train_one(cfg: Config, rd: RunDir, arch: str, source: str, rows: dict[str, list[dict]],
              test_rows: list[dict], scorer: CaptionScorer, feature_table, args) -> dict | None:
    from pipeline.students.train import decode_split, load_student, train_student
    from pipeline.students.vocab import Vocabulary

    out = rd.students / f"{arch}__{source}"
    config = {"seed": cfg.seed, "arch": arch, "source": source,
              "students": config_slice(cfg, "students")["students"]}
    for key in ("archs", "sources", "num_workers"):
        config["students"].pop(key)
    inputs = {"captions": read_manifest(source_dir(rd, source))["fingerprint"],
              "ground_truth": read_manifest(rd.data)["fingerprint"]}
    if not args.force and is_up_to_date(out, config, inputs):
        log.info("%s is up to date", out.name)
        return json.loads((out / "metrics.json").read_text())
    reset_work_dir(out, config, inputs, force=args.force)
    started = time.time()
    captions = {s: [r["caption"] for r in rows[s]] for s in ("train", "val")}
    if not captions["train"] or not captions["val"]:
        raise PipelineError(f"{source_dir(rd, source)}: source '{source}' needs non-empty train and val splits")
    vocab = Vocabulary.build(captions["train"], cfg.students.min_word_count)
    paths = {s: [r["image_path"] for r in split] for s, split in (("train", rows["train"]), ("val", rows["val"]),
                                                                   ("test", test_rows))}
    feats, encoder = decoder_inputs(cfg, arch, paths, feature_table)
    result = train_student(arch, cfg.students, feats, feats.dim, captions, vocab, out, cfg.seed, scorer, encoder)
    model, vocab, meta = load_student(out / "best", cfg.students, encoder)
    hyps = decode_split(model, feats, "test", len(test_rows), vocab, cfg.students.beam_size, cfg.students.max_length)
    predictions = {r["image_id"]: h for r, h in zip(test_rows, hyps)}
    scores = scorer.score({r["image_id"]: [r["caption"]] for r in test_rows}, predictions)
    curves = result.pop("curves")
    metrics = {"arch": arch, "source": source, "test_images": len(test_rows), "vocabulary": len(vocab),
               "test": scores, **result}
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps({"image_id": k, "caption": v}) + "\n"
                                                         for k, v in predictions.items()))
    atomic_write_json(out / "curves.json", curves)
    atomic_write_json(out / "metrics.json", metrics)
    write_manifest(out, stage="students", config=config, inputs=inputs, started=started, seed=cfg.seed,
                   figures={k: round(v, 4) for k, v in scores.items()})
    log.info("%s: %s", out.name, ", ".join(f"{k} {scores[k]:.3f}" for k in TABLE_METRICS if k in scores))
    return metrics


def finished_results(rd: RunDir) -> tuple[list[dict], dict[str, dict]]:
    """metrics.json of every finished student and baseline in the run (so parallel array tasks agree)."""
    results, baselines = [], {}
    for folder in sorted(rd.students.glob("*__*")):
        if folder.name.startswith("baseline__"):
            baselines[folder.name.split("__", 1)[1]] = json.loads((folder / "metrics.json").read_text())
        elif read_manifest(folder) is not None:
            results.append(json.loads((folder / "metrics.json").read_text()))
    return results, baselines


def summary_table(results: list[dict], baselines: dict[str, dict]) -> tuple[str, str]:
    """Markdown and CSV: one row per student x source, plus the constant-caption baselines."""
    rows = [[r["arch"], r["source"], *(r["test"].get(m) for m in METRICS)] for r in results]
    rows += [["constant baseline", s, *(b["test"].get(m) for m in METRICS)] for s, b in baselines.items()]
    header = ["model", "source", *METRICS]
    return markdown_table(header, rows), csv_text(header, rows)


def run(cfg: Config, args: argparse.Namespace) -> Path:
    from pipeline.students.encoders import ENCODER_OF
    from pipeline.students.features import cached_features

    rd = RunDir(cfg.run_dir)
    require_stage(rd.data, "prepare")
    unknown = [a for a in cfg.students.archs if a not in ENCODER_OF]
    if unknown:
        raise PipelineError(f"students.archs: unknown architecture(s) {unknown}; known: {sorted(ENCODER_OF)}")
    sources = resolve_sources(cfg, rd)
    gt = _rows(rd.data)
    test_rows = gt["test"]
    if not test_rows:
        raise PipelineError(f"{rd.data}: the ground-truth test split is empty")
    paths = sorted({r["image_path"] for s in SPLITS for r in gt[s]})
    cache: dict[str, tuple] = {}

    def feature_table(arch: str):
        enc = ENCODER_OF[arch]
        if enc not in cache:
            cache[enc] = cached_features(rd.students / "features", enc, cfg.students.encoder, cfg.seed, paths,
                                         num_workers=cfg.students.num_workers)
        return cache[enc]

    with CaptionScorer(meteor=True) as scorer:
        for source in sources:
            rows = gt if source == "gt" else _rows(rd.distill(source))
            atomic_write_json(rd.students / f"baseline__{source}" / "metrics.json",
                              baseline(scorer, [r["caption"] for r in rows["train"]], test_rows))
            for arch in cfg.students.archs:  # one lock per model: array tasks train different ones in parallel
                with claim_output(rd.students / f"{arch}__{source}", wait=waits(args)):
                    train_one(cfg, rd, arch, source, rows, test_rows, scorer, feature_table, args)
    md, table = summary_table(*finished_results(rd))
    atomic_write_text(rd.students / "summary.md", md)
    atomic_write_text(rd.students / "summary.csv", table)
    print(md)
    return rd.students


if __name__ == "__main__":
    sys.exit(stage_main("students", run))
