"""The temperature sweep's points: what each one distils and trains, the config it runs with, and its record.

Points: ``gt`` (the student on the ground truth, the reference), one per ``sweep.temperatures`` (the distilled
dataset ``sweep-t<T>``), and, once the best temperature is known, one per ``sweep.samples_per_image`` k > 1
(``sweep-t<T>-k<k>``) and with ``sweep.unlabeled`` the source ``gt+sweep-t<T>-u`` (the ground truth plus the
teacher's captions of the unlabelled images in that folder). Each k > 1 has its step control ``t<T>-k1-as-k<k>``
(:data:`STEPS`): the k = 1 dataset at the same temperature, trained for as many optimizer steps as the k point
(:func:`step_control`), so that k's gain can be told apart from its longer training. A point's record
(``<run_dir>/sweep/points/<id>.json``) holds its student's validation and test scores and its dataset's figures,
with the fingerprint of the student it was measured on: a record whose student changed is measured again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import Config, SweepConfig
from pipeline.core.errors import PipelineError
from pipeline.core.rundir import SWEEP_PREFIX, RunDir, atomic_write_json

GT, TEMPERATURE, SAMPLES, UNLABELED, STEPS = "gt", "temperature", "samples", "unlabeled", "steps"  # kinds of point
UNLABELED_ID = "unlabeled"  # the command line's name of the unlabelled point (its temperature is the best one)


@dataclass(frozen=True)
class Point:
    """One student of the sweep: ``kind``, the teacher's ``temperature`` and ``samples`` captions per image (a step
    control: the k whose training length it matches; its dataset has one)."""

    kind: str
    temperature: float | None = None
    samples: int = 1

    @property
    def id(self) -> str:
        if self.kind == GT:
            return GT
        suffix = {TEMPERATURE: "", SAMPLES: f"-k{self.samples}", UNLABELED: "-u", STEPS: f"-{self.variant}"}[self.kind]
        return f"t{self.temperature:g}{suffix}"

    @property
    def task(self) -> str:
        """The command-line name (``python -m stages.sweep --point``): the id, ``k<k>``, ``k1-as-k<k>`` or
        ``unlabeled`` for the points at the best temperature."""
        names = {SAMPLES: f"k{self.samples}", STEPS: self.variant, UNLABELED: UNLABELED_ID}
        return names.get(self.kind, self.id)

    @property
    def variant(self) -> str | None:
        """What tells a step control's student from the temperature point's, which trains on the same dataset: its
        folder is ``<arch>__<source>__<variant>``."""
        return f"k1-as-k{self.samples}" if self.kind == STEPS else None

    @property
    def captions_per_image(self) -> int:
        """The captions per image of the point's dataset (a step control's: 1)."""
        return 1 if self.kind == STEPS else self.samples

    @property
    def dataset(self) -> str | None:
        """The distilled dataset the point trains on (None: the ground truth)."""
        if self.kind == GT:
            return None
        return SWEEP_PREFIX + f"t{self.temperature:g}" if self.kind == STEPS else SWEEP_PREFIX + self.id

    @property
    def source(self) -> str:
        """The students' caption source: ``gt``, the dataset, or ``gt+<dataset>`` (its unlabelled images)."""
        if self.kind == GT:
            return GT
        return f"gt+{self.dataset}" if self.kind == UNLABELED else self.dataset


def first_points(sweep: SweepConfig) -> list[Point]:
    """What runs before the best temperature is known: the ground truth and every temperature."""
    return [Point(GT), *(Point(TEMPERATURE, t) for t in sweep.temperatures)]


def extra_ids(sweep: SweepConfig) -> list[str]:
    """The points run at the best temperature, by their command-line names: ``k<k>`` and ``unlabeled``."""
    unlabeled = [UNLABELED_ID] if sweep.unlabeled is not None else []
    many = [k for k in sweep.samples_per_image if k != 1]
    return [f"k{k}" for k in many] + [Point(STEPS, 0.0, k).task for k in many] + unlabeled


def extra_points(sweep: SweepConfig, best: float, samples_at: float | None) -> list[Point]:
    """The points run once the best temperature is known: the unlabelled images at ``best``, k samples per image at
    ``samples_at`` (the best temperature above 0: greedy samples would all be the same; None: left out) and their
    step controls."""
    many = [] if samples_at is None else [k for k in sweep.samples_per_image if k != 1]
    points = [Point(SAMPLES, samples_at, k) for k in many] + [Point(STEPS, samples_at, k) for k in many]
    return points + ([Point(UNLABELED, best)] if sweep.unlabeled is not None else [])


def parse_point(sweep: SweepConfig, point_id: str) -> Point | str:
    """A first point by its id (``gt``, ``t0.5``), or the command-line name of an extra point (:func:`extra_ids`) as
    it is; one line naming the keys when the sweep has no such point."""
    for point in first_points(sweep):
        if point.id == point_id:
            return point
    if point_id in extra_ids(sweep):
        return point_id
    known = [p.id for p in first_points(sweep)] + extra_ids(sweep)
    raise PipelineError(f"sweep point {point_id!r}: not in this sweep (sweep.temperatures, sweep.samples_per_image "
                        f"and sweep.unlabeled give {', '.join(known)})")


def point_config(cfg: Config, point: Point) -> Config:
    """A copy of ``cfg`` that distils ``point``'s dataset (the distill stage's settings at its temperature and
    samples per image; the unlabelled images only for the unlabelled point)."""
    out = cfg.model_copy(deep=True)
    if point.dataset is None:
        return out
    out.distill.name, out.distill.temperature = point.dataset, point.temperature
    out.distill.samples_per_image = point.captions_per_image
    out.distill.unlabeled = cfg.sweep.unlabeled if point.kind == UNLABELED else None
    return out


def step_control(cfg: Config, k_rows: int, rows: int) -> Config:
    """The student settings of a step control (``cfg``: its :func:`point_config`) that trains on ``rows`` training
    captions (k = 1) as the k point's student does on ``k_rows``: the same step budget (``students.max_steps``: the
    k point's epochs x its batches per epoch; ``students.epochs`` enough to reach it) and validation at the same
    steps (``students.val_every_steps``), so that early stopping, which both keep, sees the same schedule."""
    s = cfg.students
    k_batches, batches = math.ceil(k_rows / s.batch_size), math.ceil(rows / s.batch_size)
    budget = s.epochs * k_batches
    out = cfg.model_copy(deep=True)
    out.students.max_steps, out.students.epochs = budget, math.ceil(budget / batches)
    out.students.val_every_steps = s.val_every_steps or k_batches * s.val_every_epochs
    return out


def record_path(rd: RunDir, point: Point) -> Path:
    return rd.sweep / "points" / f"{point.id}.json"


def read_record(rd: RunDir, point: Point, student_fingerprint: str | None) -> dict | None:
    """The record of ``point`` when it was measured on the student of that fingerprint, with its per-image scores,
    else None."""
    try:
        record = json.loads(record_path(rd, point).read_text())
    except (OSError, ValueError):
        return None
    measured = record.get("fingerprints", {}).get("student") == student_fingerprint
    return record if measured and "per_image" in record else None


def write_record(rd: RunDir, point: Point, record: dict) -> None:
    atomic_write_json(record_path(rd, point), record)
