"""`report`: the comparison tables, plots and a sample gallery of a run.

Writes ``<run_dir>/report/``: ``results.md`` / ``results.csv`` (one row per student x caption source with n-gram
metrics, attribute accuracy and image reliance, plus the baselines), ``attributes.csv`` (per attribute),
``teacher.csv`` (diagnostics per distilled dataset), ``metrics.png`` (the teacher and the majority baseline drawn
across), ``attributes.png`` (teacher, students and baseline x attributes heat map), ``curves.png`` (per source, by
epoch), ``caption_lengths.png``, ``speed_quality.png`` (from the `speed` step's or `make bench`'s timings),
``sweep.png`` (after `make sweep`), ``gallery.html`` (self-contained: a summary, a model filter, captions marked
attribute by attribute) and ``manifest.json`` (last). results.md opens with the answer: the teacher against the best
student of each source, the recommended student and what it buys in speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.errors import PipelineError
from pipeline.core.rundir import RunDir, atomic_write_text, is_up_to_date, publish_dir, require_stage, write_manifest
from pipeline.data.formats import load_captions, split_rows
from pipeline.data.text import tokenize
from pipeline.evaluation.attributes import ATTRIBUTES
from pipeline.evaluation.results import (
    RESULT_COLUMNS,
    attribute_matrix,
    finished_results,
    merge_seeds,
    result_rows,
)
from pipeline.reporting.plots import (
    colour_floor,
    plot_attribute_heatmap,
    plot_curves,
    plot_length_histograms,
    plot_metric_bars,
    plot_speed_quality,
    plot_sweep,
)
from pipeline.reporting.tables import (
    TEACHER_COLUMNS,
    answer_markdown,
    csv_text,
    gallery_html,
    gallery_samples,
    reference_teacher,
    results_markdown,
    speed_report,
    sweep_report,
    teacher_rows,
)
from pipeline.workflows import depends
from pipeline.workflows.depends import source_dir
from pipeline.workflows.students import write_summary
from stages.cli import claims, stage_main

log = logging.getLogger("report")


def with_teacher(labels: list[str], matrix: list[list[float]], teacher: dict | None
                 ) -> tuple[list[str], list[list[float]]]:
    """The heat map's rows with the teacher's (its most precise captions) first."""
    if teacher is None:
        return labels, matrix
    per_attribute = teacher["test"]["attributes"]["per_attribute"]
    return ([f"teacher ({teacher['dataset']})", *labels], [[per_attribute[a] for a in ATTRIBUTES], *matrix])


@claims(lambda cfg, args: RunDir(cfg.run_dir).report)
def run(cfg: Config, args: argparse.Namespace) -> Path:
    started = time.time()
    rd = RunDir(cfg.run_dir)
    require_stage(rd.data, "prepare")
    results, baselines = finished_results(rd)
    if not results:
        raise PipelineError(f"{rd.students}: no finished students; run the 'students' stage first")
    config, inputs = depends.report(cfg, rd)
    if not args.force and is_up_to_date(rd.report, config, inputs):
        log.info("%s is up to date (use --force to rerun)", rd.report)
        return rd.report
    write_summary(rd)  # the students' own tables, with every student that finished
    teacher = teacher_rows(rd)
    lengths = {source: [len(tokenize(r["caption"], keep_punct=False))
                        for r in split_rows(load_captions(source_dir(rd, source) / "captions"), "train")]
               for source in ["gt", *rd.distilled_sources()]}
    curves = {(r["arch"], r["source"]): {**json.loads((r["folder"] / "curves.json").read_text()),  # the first seed's
                                         "steps_per_epoch": r["runs"][0]["steps"] / max(1, r["runs"][0]["epochs_run"])}
              for r in merge_seeds(results)}
    labels, matrix = attribute_matrix(results, baselines)
    reference = reference_teacher(rd)  # None without a distilled dataset
    majority = baselines.get("gt", {}).get("majority", {}).get("macro")
    speed = speed_report(rd, results)  # None until the `speed` step or `make bench` times the run
    sweep = sweep_report(rd)  # None until `make sweep` has finished
    answer = answer_markdown(results, baselines, reference, speed)
    with publish_dir(rd.report) as tmp:
        atomic_write_text(tmp / "results.md", results_markdown(results, baselines, teacher, speed, sweep, answer))
        atomic_write_text(tmp / "results.csv", csv_text(RESULT_COLUMNS, result_rows(results, baselines)))
        atomic_write_text(tmp / "attributes.csv", csv_text(["model", *ATTRIBUTES],
                                                           [[label, *row] for label, row in zip(labels, matrix)]))
        atomic_write_text(tmp / "teacher.csv", csv_text(TEACHER_COLUMNS, teacher))
        plot_metric_bars(merge_seeds(results), tmp / "metrics.png", reference, majority)
        if matrix:
            plot_attribute_heatmap(*with_teacher(labels, matrix, reference), tmp / "attributes.png",
                                   floor=colour_floor(majority))
        plot_curves(curves, tmp / "curves.png")
        if speed:
            plot_speed_quality(speed.records, speed.batch_size, tmp / "speed_quality.png")
        if sweep:
            plot_sweep(sweep.records, sweep.best, tmp / "sweep.png")
        plot_length_histograms(lengths, tmp / "caption_lengths.png")
        samples = gallery_samples(rd, results, cfg.report.gallery_size, cfg.seed)
        atomic_write_text(tmp / "gallery.html", gallery_html(samples, f"fashion-distill samples — {cfg.run_dir.name}"))
        write_manifest(tmp, stage="report", config=config, inputs=inputs, started=started, seed=cfg.seed,
                       figures={"students": len(results), "sources": sorted({r["source"] for r in results})})
    print((rd.report / "results.md").read_text())
    log.info("report written to %s", rd.report)
    return rd.report


if __name__ == "__main__":
    sys.exit(stage_main("report", run))
