"""Running the temperature sweep (`make sweep`).

Each point's dataset is distilled by the distill stage's own function (:func:`pipeline.workflows.distill
.distill_dataset`: per-image seeds, batching, resumable generations) on a copy of the config, and its student is
trained by the students' (:func:`pipeline.workflows.students.run_experiment`: skipped when up to date, resumed from
``last/``), then the best checkpoint captions the ground-truth validation split (what the temperature is chosen on)
into the point's record. :func:`run_sweep` runs every point and writes ``<run_dir>/sweep/``: ``points.json``,
``sweep.csv``, ``best.json``, ``sweep.png`` and ``manifest.json`` (last); :func:`run_point` runs one point (a Slurm
array task).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from functools import cached_property
from pathlib import Path
from typing import Self

from pipeline.core.config import Config, config_slice
from pipeline.core.errors import PipelineError
from pipeline.core.rundir import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    claim_output,
    is_up_to_date,
    read_manifest,
    require_stage,
    reset_work_dir,
    stage_fingerprint,
    write_manifest,
)
from pipeline.data.diagnostics import caption_diagnostics
from pipeline.data.formats import SPLITS, load_splits
from pipeline.demo.standins import stand_in_weights
from pipeline.reporting.plots import plot_sweep
from pipeline.reporting.tables import csv_text
from pipeline.sweep.points import (
    SAMPLES,
    STEPS,
    Point,
    extra_ids,
    extra_points,
    first_points,
    parse_point,
    point_config,
    read_record,
    write_record,
)
from pipeline.sweep.summary import (
    SWEEP_COLUMNS,
    TEST_METRICS,
    VAL_METRICS,
    best_summary,
    best_temperatures,
    sweep_rows,
)
from pipeline.workflows import depends

log = logging.getLogger(__name__)
class SweepRun:
    """What the points of one sweep share: the config, the ground truth and, built on first use, the caption scorer
    and the students' feature sources. Closes the scorer when the ``with`` block ends."""

    def __init__(self, cfg: Config, *, force: bool, wait: bool):
        self.cfg, self.force, self.wait = cfg, force, wait
        self.rd = RunDir(cfg.run_dir)
        self.arch = cfg.sweep.student
        require_stage(self.rd.data, "prepare")
        self.gt = load_splits(self.rd.data / "captions")
        for split in ("val", "test"):
            if not self.gt[split]:
                raise PipelineError(f"{self.rd.data}: the ground-truth {split} split is empty; the sweep scores on it")
        self._stack = contextlib.ExitStack()
        self._inputs: dict[frozenset[str], object] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @cached_property
    def scorer(self):
        from pipeline.evaluation.metrics import CaptionScorer

        return self._stack.enter_context(CaptionScorer(meteor=True))

    def decoder_inputs(self, rows: dict[str, list[dict]]):
        """The feature source of a student trained on ``rows`` (its own images and the ground truth's)."""
        from pipeline.students.features import DecoderInputs

        paths = frozenset(r["image_path"] for split in (self.gt, rows) for s in SPLITS for r in split[s])
        if paths not in self._inputs:
            cfg = self.cfg
            self._inputs[paths] = DecoderInputs(self.rd.students / "features", cfg.students, cfg.seed, sorted(paths),
                                                stand_in_weights(cfg))
        return self._inputs[paths]

    def distill(self, point: Point) -> None:
        """Distil ``point``'s dataset (nothing for the ground truth; skipped when up to date, resumed when killed)."""
        from pipeline.workflows.distill import distill_dataset

        if point.dataset is not None:
            distill_dataset(point_config(self.cfg, point), force=self.force, wait=self.wait)

    def rows(self, point: Point) -> dict[str, list[dict]]:
        """The captions ``point``'s student trains on (its source's train rows; validation and test: the ground
        truth's, as for every student)."""
        from pipeline.workflows.students import source_rows

        return source_rows(self.rd, point.source, self.gt)

    def train(self, point: Point) -> dict:
        """Train (or read back) ``point``'s student and measure it on the ground-truth validation split; its record."""
        from pipeline.workflows.students import run_experiment, score_checkpoint

        rd = self.rd
        cfg, out = depends.sweep_student(self.cfg, rd, point)
        with claim_output(out, wait=self.wait):
            key = depends.student(cfg, rd, self.arch, point.source)
            wanted = stage_fingerprint(*key)
            record = None if self.force else read_record(rd, point, wanted)
            if record is not None and is_up_to_date(out, *key):
                return record
            rows = self.rows(point)
            inputs = self.decoder_inputs(rows)
            metrics = run_experiment(cfg, rd, arch=self.arch, source=point.source, rows=rows,
                                     test_rows=self.gt["test"], scorer=self.scorer, decoder_inputs=inputs,
                                     force=self.force, variant=point.variant)
            val = score_checkpoint(out / "best", self.gt["val"], self.scorer, inputs, cfg.students.beam_size)
            test_per_image = json.loads((out / "per_image.json").read_text())["best"]
        record = {"point": point.id, "kind": point.kind, "temperature": point.temperature,
                  "samples_per_image": point.captions_per_image, "dataset": point.dataset,
                  "source": point.source, "student": self.arch, "steps": metrics.get("steps"),
                  "val": {"attributes": val["attributes"]["macro"],
                          **{m: val["scores"][m] for m in VAL_METRICS[1:]}},
                  "test": {"attributes": metrics["attributes"]["macro"],
                           **{m: metrics["test"][m] for m in TEST_METRICS[1:] if m in metrics["test"]},
                           "attribute_reliance_drop": metrics["image_reliance"]["attribute_macro_drop"]},
                  "teacher": self.teacher_figures(point),
                  "per_image": {"val": val["per_image"], "test": test_per_image},  # for the paired bootstrap
                  **({"control_of": Point(SAMPLES, point.temperature, point.samples).id} if point.kind == STEPS
                     else {}),
                  "fingerprints": {"student": wanted, "dataset": point.dataset and
                                   read_manifest(rd.distill(point.dataset))["fingerprint"]}}
        write_record(rd, point, record)
        log.info("sweep %s: val attributes %.3f CIDEr-D %.3f; test attributes %.3f CIDEr-D %.3f", point.id,
                 record["val"]["attributes"], record["val"]["CIDEr-D"], record["test"]["attributes"],
                 record["test"]["CIDEr-D"])
        return record

    def teacher_figures(self, point: Point) -> dict:
        """The training captions' distinct-2 and mean length, and (a distilled dataset) the teacher's agreement with
        the ground truth on the same images (BLEU-4, CIDEr-D, attribute accuracy)."""
        if point.dataset is None:
            d = caption_diagnostics([r["caption"] for s in ("train", "val") for r in self.gt[s]])
            return {"distinct_2": d["distinct_2"], "length_mean": d["length_mean"], "vs_ground_truth": None}
        d = json.loads((self.rd.distill(point.dataset) / "diagnostics.json").read_text())
        vs = d["vs_ground_truth"]
        return {"distinct_2": d["distinct_2"], "length_mean": d["length_mean"],
                "vs_ground_truth": {"BLEU-4": vs["BLEU-4"], "CIDEr-D": vs["CIDEr-D"],
                                    "attributes": vs["attributes"]["macro"]}}

    def point(self, point: Point) -> dict:
        self.distill(point)
        return self.train(point)

    def first_records(self) -> list[dict]:
        """The records of the ground truth and every temperature, when all are measured on their current students
        (what the best temperature is chosen from); one line naming what to run when one is not."""
        records = []
        for point in first_points(self.cfg.sweep):
            cfg, _ = depends.sweep_student(self.cfg, self.rd, point)
            wanted = stage_fingerprint(*depends.student(cfg, self.rd, self.arch, point.source))
            record = read_record(self.rd, point, wanted)
            if record is None:
                raise PipelineError(f"sweep point {point.id}: not measured yet; run it first (python -m stages.sweep "
                                    f"--point {point.id})")
            records.append(record)
        return records

    def extra_points(self, records: list[dict]) -> list[Point]:
        """The points at the best temperature, chosen from ``records`` (:func:`first_records`)."""
        points = extra_points(self.cfg.sweep, *best_temperatures(records, self.cfg.sweep))
        left_out = set(extra_ids(self.cfg.sweep)) - {p.task for p in points}
        if left_out:
            log.warning("sweep: %s left out: every temperature is 0 (greedy), so k samples would all be the same",
                        ", ".join(sorted(left_out)))
        return points


def _work_folder(cfg: Config, rd: RunDir, *, force: bool, wait: bool) -> None:
    """Ready ``<run_dir>/sweep/`` for these sweep settings (records of other settings, or of a finished sweep that is
    rerun, go: they are measured again from the students, which stay)."""
    with claim_output(rd.sweep, wait=wait):
        reset_work_dir(rd.sweep, {"seed": cfg.seed, **config_slice(cfg, "sweep")}, {}, force=force)


def run_point(cfg: Config, point_id: str, *, only: str | None = None, force: bool = False,
              wait: bool = False) -> dict | None:
    """One point (``gt``, ``t<T>``, ``k<k>`` or ``unlabeled``; the last two at the best temperature, chosen from the
    measured first points): distil its dataset and train and measure its student, or ``only`` one of the two
    (``distill``, ``train``: what the Slurm arrays run). Returns its record (None when it only distilled, or a k
    point that every temperature being 0 leaves out)."""
    rd = RunDir(cfg.run_dir)
    _work_folder(cfg, rd, force=False, wait=wait)  # a forced point does not wipe its siblings' records
    with SweepRun(cfg, force=force, wait=wait) as run:
        point = parse_point(cfg.sweep, point_id)
        if isinstance(point, str):  # at the best temperature
            point = next((p for p in run.extra_points(run.first_records()) if p.task == point_id), None)
            if point is None:
                return None
        with claim_output(rd.sweep, part=f"point-{point.id}", wait=wait):
            if only != "train":
                run.distill(point)
            return None if only == "distill" else run.train(point)


def sweep_up_to_date(cfg: Config, rd: RunDir) -> bool:
    """Whether ``<run_dir>/sweep/`` is finished for this config and every point's dataset and student."""
    try:
        return is_up_to_date(rd.sweep, *depends.sweep(cfg, rd))
    except (PipelineError, OSError, ValueError, KeyError):
        return False


def run_sweep(cfg: Config, *, force: bool = False, wait: bool = False) -> Path:
    """Every point, then the table, the choice of temperature and the plot in ``<run_dir>/sweep/``; a finished
    sweep is left as it is (``force``: every point distilled and trained again)."""
    rd = RunDir(cfg.run_dir)
    with claim_output(rd.sweep, wait=wait):
        if not force and sweep_up_to_date(cfg, rd):
            log.info("%s is up to date (use --force to rerun)", rd.sweep)
            return rd.sweep
        started = time.time()
        _work_folder(cfg, rd, force=force, wait=wait)
        with SweepRun(cfg, force=force, wait=wait) as run:
            records = [run.point(p) for p in first_points(cfg.sweep)]
            records += [run.point(p) for p in run.extra_points(records)]
        return write_summary(cfg, rd, records, started)


def comparison_intervals(records: list[dict], comparisons: list[dict]) -> None:
    """Each of ``comparisons`` (:func:`pipeline.sweep.summary.comparisons`) gets ``intervals``: split -> metric ->
    the paired bootstrap (:func:`pipeline.evaluation.bootstrap.compare`) of the point against its baseline over the
    ground-truth validation and test images (the records' ``per_image``)."""
    from pipeline.evaluation.bootstrap import compare

    by_point = {r["point"]: r["per_image"] for r in records}
    for c in comparisons:
        c["intervals"] = {split: compare([by_point[c["baseline"]][split]], [by_point[c["point"]][split]])
                          for split in ("val", "test")}


def write_summary(cfg: Config, rd: RunDir, records: list[dict], started: float) -> Path:
    """``points.json`` (the records without their per-image scores), ``sweep.csv``, ``best.json`` (its comparisons
    with their intervals), ``sweep.png``, then ``manifest.json``."""
    best = best_summary(records, cfg.sweep)
    comparison_intervals(records, best["comparisons"])
    records = [{k: v for k, v in r.items() if k != "per_image"} for r in records]
    atomic_write_json(rd.sweep / "points.json", records)
    atomic_write_text(rd.sweep / "sweep.csv", csv_text(SWEEP_COLUMNS, sweep_rows(records, best)))
    atomic_write_json(rd.sweep / "best.json", best)
    plot_sweep(records, best, rd.sweep / "sweep.png")
    config, inputs = depends.sweep(cfg, rd)
    write_manifest(rd.sweep, stage="sweep", config=config, inputs=inputs, started=started, seed=cfg.seed,
                   figures={"points": len(records), "temperature": best["temperature"],
                            "validation": best["validation"], "test": best["test"]})
    log.info("sweep: best temperature %g by validation %s (%.3f); test attributes %.3f, CIDEr-D %.3f",
             best["temperature"], cfg.sweep.select_on, best["validation"][cfg.sweep.select_on],
             best["test"]["attributes"], best["test"]["CIDEr-D"])
    return rd.sweep
