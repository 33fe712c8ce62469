"""`report`: the comparison tables, plots and a sample gallery of a run.

Writes ``<run_dir>/report/``: ``results.md`` / ``results.csv`` (one row per student x caption source, the course
reports' columns), ``teacher.csv`` (diagnostics per distilled dataset), ``metrics.png``, ``curves.png``,
``caption_lengths.png``, ``gallery.html`` (self-contained) and ``manifest.json`` (last).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

from pipeline.config import Config, config_slice
from pipeline.data.formats import load_captions, split_rows
from pipeline.data.text import tokenize
from pipeline.errors import PipelineError
from pipeline.reporting import (ARCH_NAMES, SEED_ORDER, csv_text, gallery_html, markdown_table, plot_curves,
                                plot_length_histograms, plot_metric_bars, student_rows)
from pipeline.rundir import (RunDir, atomic_write_text, is_up_to_date, publish_dir, read_manifest,
                             require_stage, write_manifest)
from stages.cli import claims, stage_main
from stages.students import finished_results, source_dir

log = logging.getLogger("report")
TEACHER_COLUMNS = ("dataset", "temperature", "captions", "mean length", "p95 length", "vocabulary", "distinct-1",
                   "distinct-2", "BLEU-4 vs GT", "CIDEr-D vs GT", "teacher test BLEU-4", "teacher test CIDEr-D")
RESULT_COLUMNS = ("model", "trained on", *SEED_ORDER)


def _student_results(rd: RunDir) -> tuple[list[dict], dict[str, dict]]:
    results, baselines = finished_results(rd)
    results = [{**r, "folder": rd.students / f"{r['arch']}__{r['source']}"} for r in results]
    order = list(ARCH_NAMES)  # the course reports' order; sources: gt first, then by name
    results.sort(key=lambda r: (r["source"] != "gt", r["source"],
                                order.index(r["arch"]) if r["arch"] in order else len(order)))
    if not results:
        raise PipelineError(f"{rd.students}: no finished students; run the 'students' stage first")
    return results, baselines


def _teacher_rows(rd: RunDir) -> list[list]:
    rows = []
    for name in rd.distilled_sources():
        d = json.loads((rd.distill(name) / "diagnostics.json").read_text())
        meta = json.loads((rd.distill(name) / "meta.json").read_text())
        test = d.get("teacher_on_test", {})
        rows.append([name, meta["temperature"], d["captions"], d["length_mean"], d["length_p95"], d["vocabulary"],
                     d["distinct_1"], d["distinct_2"], d["vs_ground_truth"]["BLEU-4"], d["vs_ground_truth"]["CIDEr-D"],
                     test.get("BLEU-4"), test.get("CIDEr-D")])
        if not any(r[0] == "ground truth" for r in rows):
            g = d["ground_truth"]
            rows.insert(0, ["ground truth", None, g["captions"], g["length_mean"], g["length_p95"], g["vocabulary"],
                            g["distinct_1"], g["distinct_2"], None, None, None, None])
    return rows


def _results_markdown(results: list[dict], baselines: dict, teacher_rows: list[list]) -> str:
    gt = [r for r in results if r["source"] == "gt"]
    distilled = [r for r in results if r["source"] != "gt"]
    parts = ["# Results\n", "All students are scored on the ground-truth test split (pycocoevalcap: BLEU-4, CIDEr-D, "
             "METEOR 1.5, ROUGE-L).\n", "## Students trained on the ground truth\n",
             markdown_table(RESULT_COLUMNS, student_rows(gt, {k: v for k, v in baselines.items() if k == "gt"}))]
    if distilled:
        parts += ["\n## Students trained on teacher captions\n",
                  markdown_table(RESULT_COLUMNS,
                                 student_rows(distilled, {k: v for k, v in baselines.items() if k != "gt"}))]
    if teacher_rows:
        parts += ["\n## Teacher datasets\n", markdown_table(TEACHER_COLUMNS, teacher_rows)]
    parts += ["\nPlots: `metrics.png`, `curves.png`, `caption_lengths.png`. Samples: `gallery.html`.\n"]
    return "\n".join(parts)


def _gallery_samples(cfg: Config, rd: RunDir, results: list[dict]) -> list[dict]:
    test = split_rows(load_captions(rd.data / "captions"), "test")
    picked = random.Random(cfg.seed).sample(test, min(cfg.report.gallery_size, len(test)))
    teacher = {name: json.loads((rd.distill(name) / "test_generations.json").read_text())
               for name in rd.distilled_sources() if (rd.distill(name) / "test_generations.json").is_file()}
    predictions = {}
    for r in results:
        lines = (r["folder"] / "predictions.jsonl").read_text().splitlines()
        predictions[f"{ARCH_NAMES.get(r['arch'], r['arch'])} ← {r['source']}"] = {
            x["image_id"]: x["caption"] for x in map(json.loads, lines)}
    samples = []
    for row in picked:
        captions = {"ground truth": row["caption"]}
        captions.update({f"teacher ({name})": gen.get(row["image_id"]) for name, gen in teacher.items()})
        captions.update({label: preds.get(row["image_id"]) for label, preds in predictions.items()})
        samples.append({"image_id": row["image_id"], "image_path": row["image_path"], "captions": captions})
    return samples


@claims(lambda cfg, args: RunDir(cfg.run_dir).report)
def run(cfg: Config, args: argparse.Namespace) -> Path:
    started = time.time()
    rd = RunDir(cfg.run_dir)
    require_stage(rd.data, "prepare")
    results, baselines = _student_results(rd)
    inputs = {r["folder"].name: read_manifest(r["folder"])["fingerprint"] for r in results}
    inputs.update({f"distill/{n}": read_manifest(rd.distill(n))["fingerprint"] for n in rd.distilled_sources()})
    config = {"seed": cfg.seed, "report": config_slice(cfg, "report")["report"]}
    if not args.force and is_up_to_date(rd.report, config, inputs):
        log.info("%s is up to date (use --force to rerun)", rd.report)
        return rd.report
    teacher_rows = _teacher_rows(rd)
    rows = student_rows(results, baselines)
    lengths = {source: [len(tokenize(r["caption"], keep_punct=False))
                        for r in split_rows(load_captions(source_dir(rd, source) / "captions"), "train")]
               for source in ["gt", *rd.distilled_sources()]}
    curves = {f"{r['arch']}←{r['source']}": json.loads((r["folder"] / "curves.json").read_text()) for r in results}
    with publish_dir(rd.report) as tmp:
        atomic_write_text(tmp / "results.md", _results_markdown(results, baselines, teacher_rows))
        atomic_write_text(tmp / "results.csv", csv_text(RESULT_COLUMNS, rows))
        atomic_write_text(tmp / "teacher.csv", csv_text(TEACHER_COLUMNS, teacher_rows))
        plot_metric_bars(results, tmp / "metrics.png")
        plot_curves(curves, tmp / "curves.png")
        plot_length_histograms(lengths, tmp / "caption_lengths.png")
        atomic_write_text(tmp / "gallery.html", gallery_html(_gallery_samples(cfg, rd, results),
                                                             f"fashion-distill samples — {cfg.run_dir.name}"))
        write_manifest(tmp, stage="report", config=config, inputs=inputs, started=started, seed=cfg.seed,
                       figures={"students": len(results), "sources": sorted({r["source"] for r in results})})
    print((rd.report / "results.md").read_text())
    log.info("report written to %s", rd.report)
    return rd.report


if __name__ == "__main__":
    sys.exit(stage_main("report", run))
