"""The temperature sweep as Slurm job arrays (``slurm.sweep: true``), by the rules of the main chain.

After finetune: ``sweep-distill`` (an array task per temperature: its dataset), ``sweep-train`` (a task per point,
the ground truth and each temperature: its student and validation record), then, at the best temperature that those
records give, ``sweep-extra-distill`` and ``sweep-extra-train`` (k captions per image, the unlabelled images), and
the ``sweep`` job (table, choice, plot; it finds every point finished). An array lists the points whose output is not
up to date by its stage's own rule; a job is left out when it lists none and none of the jobs it waits for is
submitted. ``force`` submits every point with ``--force``; the ``sweep`` job then summarises what they made.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from pipeline import depends
from pipeline.cluster.slurm import Job, _stage, _up_to_date
from pipeline.config import Config
from pipeline.rundir import RunDir, stage_fingerprint
from pipeline.sweep.points import Point, extra_ids, extra_points, first_points, point_config, read_record
from pipeline.sweep.summary import best_temperatures


def _array(name: str, config: Path, overrides: list[str], points: Sequence[str], only: str, after: list[str],
           gpus: int, done: bool, *flags: str) -> Job:
    """An array job running ``python -m stages.sweep --point <p> --only <only>`` for each of ``points``."""
    command = (f"points=({' '.join(map(shlex.quote, points))})\n"
               + _stage("sweep", config, overrides, '--point "${points[$SLURM_ARRAY_TASK_ID]}"', f"--only {only}",
                        *flags))
    return Job(name, command, after, array=len(points), gpus=gpus, done=done)


def plan_sweep(cfg: Config, config: Path, overrides: list[str], *, prepared: bool, finetuned: bool,
               force: bool) -> list[Job]:
    """The sweep's jobs; ``prepared`` / ``finetuned``: the prepare / finetune job is left out (up to date)."""
    rd, arch = RunDir(cfg.run_dir), cfg.sweep.student
    gpus = min(cfg.slurm.gpus_per_node, 1)
    flags = ["--force"] if force else []

    def distilled(point: Point) -> bool:
        return point.dataset is None or (not force and finetuned and _up_to_date(
            rd.distill(point.dataset), partial(depends.distill, point_config(cfg, point), rd)))

    def measured(point: Point) -> bool:
        pcfg, folder = point_config(cfg, point), rd.students / f"{arch}__{point.source}"
        key = partial(depends.student, pcfg, rd, arch, point.source)
        return (not force and prepared and distilled(point) and _up_to_date(folder, key)
                and read_record(rd, point, stage_fingerprint(*key())) is not None)

    first = first_points(cfg.sweep)
    distill_todo = [p.task for p in first if not distilled(p)]
    train_todo = [p.task for p in first if not measured(p)]
    jobs = [_array("sweep-distill", config, overrides, distill_todo or [p.task for p in first if p.dataset],
                   "distill", ["finetune"], gpus, not distill_todo, *flags),
            _array("sweep-train", config, overrides, train_todo or [p.task for p in first], "train",
                   ["prepare", "sweep-distill"], gpus, not train_todo, "--wait", *flags)]
    if extra_ids(cfg.sweep):
        if train_todo:  # the best temperature is not known yet: every extra point runs
            extra_distill = extra_train = extra_ids(cfg.sweep)
        else:
            records = [read_record(rd, p, stage_fingerprint(*depends.student(point_config(cfg, p), rd, arch,
                                                                             p.source))) for p in first]
            extras = extra_points(cfg.sweep, *best_temperatures(records, cfg.sweep))
            extra_distill = [p.task for p in extras if not distilled(p)]
            extra_train = [p.task for p in extras if not measured(p)]
        everything = extra_ids(cfg.sweep)
        jobs += [_array("sweep-extra-distill", config, overrides, extra_distill or everything, "distill",
                        ["finetune", "sweep-train"], gpus, not extra_distill, *flags),
                 _array("sweep-extra-train", config, overrides, extra_train or everything, "train",
                        ["prepare", "sweep-train", "sweep-extra-distill"], gpus, not extra_train, "--wait", *flags)]
    summary = Job("sweep", _stage("sweep", config, overrides), [j.name for j in jobs])
    summary.done = all(j.done for j in jobs) and not force and _up_to_date(rd.sweep, partial(depends.sweep, cfg, rd))
    return [*jobs, summary]

