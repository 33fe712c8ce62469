"""The chain of stages, described once: what runs, after what, in how many array tasks.

``plan_chain`` returns :class:`Job` s in priority order; both runners consume the same list: `make demo`'s local
scheduler (:func:`pipeline.orchestration.scheduler.local_steps`, one step per job or array task) and `make submit`
(:mod:`pipeline.orchestration.slurm`, one sbatch script per job). The chain:

    prepare -> finetune -> per distilled dataset: [reset ->] distill (array over shards) [-> merge]
    prepare -> features (the frozen encoders' caches) -> per caption source: students (array over architectures)
    [with the sweep: sweep-distill -> sweep-train -> (k, unlabelled points) -> sweep] -> speed -> report

`speed` times the teacher and every student on the CPU, quickly, for the report's answer (`make bench` times them
thoroughly; either stays current while the models do).

A source's students wait only for their own dataset, so the ground truth's students train while the teacher
fine-tunes. A job is marked ``done`` (left out) when its stage's own rule (:mod:`pipeline.workflows.depends`) finds
its output up to date and no job it waits for runs; an array lists only its tasks whose output is not up to date.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pipeline.core.archs import ARCHS
from pipeline.core.config import Config, load_config
from pipeline.core.errors import PipelineError
from pipeline.core.rundir import RunDir, in_use, is_up_to_date, read_manifest, stage_fingerprint
from pipeline.sweep.points import Point, extra_ids, extra_points, first_points, point_config, read_record
from pipeline.sweep.summary import best_temperatures
from pipeline.workflows import depends


@dataclass
class Job:
    """One stage command of the chain: ``python -m stages.<stage> --config <config> <args>`` (+ a task's args)."""

    name: str  # unique within the chain: the local step's and the Slurm job's name
    stage: str
    args: list[str] = field(default_factory=list)  # overrides and flags
    after: list[str] = field(default_factory=list)  # jobs it waits for
    tasks: list[list[str]] | None = None  # an array: each task's extra args (one local step / Slurm task each)
    kind: str = "cpu"  # resources: cpu (no GPU), gpu (one GPU a task), finetune (every GPU of its nodes)
    done: bool = False  # output up to date: not run
    outputs: list[Path] = field(default_factory=list)  # the folders it writes (`make status` reads their state)


def up_to_date(folder: Path, key: Callable[[], depends.Depends]) -> bool:
    """The stage's own rule: ``folder`` holds a finished output of exactly the config and inputs ``key`` gives."""
    if read_manifest(folder) is None:
        return False
    try:
        return is_up_to_date(folder, *key())
    except (PipelineError, OSError):  # an input is missing or unreadable: the job runs and its stage says what
        return False


def sources(cfg: Config) -> list[str]:
    """The students' caption sources: ``students.sources``, or the ground truth and every configured dataset."""
    return cfg.students.sources or ["gt", *cfg.distill.temperatures]


def plan_chain(cfg: Config, config: Path, overrides: Sequence[str], *, force: bool = False, shards: int = 1,
               sweep: bool = False, flags: Sequence[str] = ()) -> list[Job]:
    """The chain's jobs in priority order; ``cfg`` is what ``config`` + ``overrides`` load.

    ``shards``: distill array size (> 1 adds the reset and merge jobs); ``sweep``: the temperature sweep's jobs
    too; ``flags``: passed to every job (``--wait``). ``force`` reruns every job with ``--force``, except the distill
    shards: their reset job wipes the folder once for all of them.
    """
    rd = RunDir(cfg.run_dir)
    overrides, flags = list(overrides), list(flags)
    forced = [*flags, "--force"] if force else flags
    jobs: dict[str, Job] = {}

    def add(job: Job, folder: Path, key: Callable[[], depends.Depends]) -> Job:
        job.done = not force and all(jobs[name].done for name in job.after) and up_to_date(folder, key)
        job.outputs = [folder]
        jobs[job.name] = job
        return job

    add(Job("prepare", "prepare", [*overrides, *forced]), rd.data, partial(depends.prepare, cfg))
    add(Job("finetune", "finetune", [*overrides, *forced], ["prepare"], kind="finetune"), rd.teacher,
        partial(depends.finetune, cfg, rd))
    datasets: dict[str, Job] = {}  # distilled dataset name -> the job that finishes it
    for name, temperature in cfg.distill.temperatures.items():
        pinned = [*overrides, f"distill.temperature={temperature}", f"distill.name={name}"]
        folder, key = rd.distill(name), partial(depends.distill, load_config(config, pinned), rd)
        if shards == 1:
            datasets[name] = add(Job(f"distill-{name}", "distill", [*pinned, *forced], ["finetune"], kind="gpu"),
                                 folder, key)
            continue
        add(Job(f"reset-{name}", "distill", [*pinned, "--reset", *forced], ["finetune"]), folder, key)
        add(Job(f"distill-{name}", "distill", [*pinned, *flags], [f"reset-{name}"], kind="gpu",
                tasks=[["--shard", f"{i}/{shards}"] for i in range(shards)]), folder, key)
        datasets[name] = add(Job(f"merge-{name}", "distill", [*pinned, "--merge", *forced], [f"distill-{name}"]),
                             folder, key)

    archs = sorted(cfg.students.archs, key=lambda a: -ARCHS[a].cpu_cost)  # the costly ones first
    todo: dict[str, list[str]] = {}  # source -> the architectures to train (inputs rerun or output not up to date)
    for source in sources(cfg):
        dataset = depends.source_dataset(source)  # gt+<name> waits for <name> too
        upstream_done = jobs["prepare"].done and (dataset not in datasets or datasets[dataset].done)
        todo[source] = [a for a in archs if force or not upstream_done or not all(up_to_date(
            depends.student_folder(cfg, rd, a, source, seed),
            partial(depends.student, _pinned(config, overrides, a, source), rd, a, source, seed))
            for seed in depends.model_seeds(cfg))]
    stale = [a for source in todo for a in todo[source]]
    if not cfg.students.encoder.finetune:  # frozen encoders: their feature caches are built once, before the arrays
        feature_archs = list(dict.fromkeys(stale or archs))
        jobs["features"] = Job("features", "students", [*overrides, f"students.archs=[{','.join(feature_archs)}]",
                                                         "--features-only", *forced], ["prepare"], kind="gpu",
                               done=not stale, outputs=[rd.students / "features"])
    for source, wanted in todo.items():
        dataset = depends.source_dataset(source)
        after = ["prepare", *(["features"] if "features" in jobs else []),
                 *([datasets[dataset].name] if dataset in datasets else [])]
        jobs[f"students-{source}"] = Job(
            f"students-{source}", "students", [*overrides, f"students.sources=[{source}]", *forced], after,
            tasks=[[f"students.archs=[{a}]"] for a in (wanted or archs)], kind="gpu", done=not wanted,
            outputs=[rd.students / f"{a}__{source}" for a in archs])
    if sweep:
        jobs.update((j.name, j) for j in plan_sweep(cfg, config, overrides, prepared=jobs["prepare"].done,
                                                     finetuned=jobs["finetune"].done, force=force, flags=flags))
    after = [*(n for n in jobs if n.startswith("students-")), *(j.name for j in datasets.values())]
    add(Job("speed", "speed", [*overrides, *forced], ["finetune", *after]), rd.speed, partial(depends.speed, cfg, rd))
    add(Job("report", "report", [*overrides, *forced], [*after, "speed", *(["sweep"] if sweep else [])]), rd.report,
        partial(depends.report, cfg, rd))
    return list(jobs.values())


def _pinned(config: Path, overrides: list[str], arch: str, source: str) -> Config:
    return load_config(config, [*overrides, f"students.archs=[{arch}]", f"students.sources=[{source}]"])


def plan_sweep(cfg: Config, config: Path, overrides: Sequence[str], *, prepared: bool, finetuned: bool,
               force: bool, flags: Sequence[str] = ()) -> list[Job]:
    """The temperature sweep's jobs (``prepared`` / ``finetuned``: the prepare / finetune job is left out).

    ``sweep-distill`` (a task per temperature: its dataset), ``sweep-train`` (a task per point, the ground truth and
    each temperature: its student and validation record), then, at the best temperature those records give,
    ``sweep-extra-distill`` and ``sweep-extra-train`` (k captions per image and their step controls, the unlabelled
    images), and ``sweep``
    (table, choice, plot). An array lists the points whose output is not up to date; ``force`` runs every point
    with ``--force`` and the ``sweep`` job then summarises what they made.
    """
    rd, arch = RunDir(cfg.run_dir), cfg.sweep.student
    overrides = list(overrides)
    forced = [*flags, "--force"] if force else list(flags)

    def distilled(point: Point) -> bool:
        return point.dataset is None or (not force and finetuned and up_to_date(
            rd.distill(point.dataset), partial(depends.distill, point_config(cfg, point), rd)))

    def measured(point: Point) -> bool:
        try:
            pcfg, folder = depends.sweep_student(cfg, rd, point)
        except PipelineError:  # a step control before its k point's dataset is distilled
            return False
        key = partial(depends.student, pcfg, rd, arch, point.source)
        return (not force and prepared and distilled(point) and up_to_date(folder, key)
                and read_record(rd, point, stage_fingerprint(*key())) is not None)

    def array(name: str, points: list[str], only: str, after: list[str], done: bool, *extra: str) -> Job:
        return Job(name, "sweep", [*overrides, "--only", only, *extra, *forced], after, kind="gpu", done=done,
                   tasks=[["--point", p] for p in points])

    first = first_points(cfg.sweep)
    distill_todo = [p.task for p in first if not distilled(p)]
    train_todo = [p.task for p in first if not measured(p)]
    jobs = [array("sweep-distill", distill_todo or [p.task for p in first if p.dataset], "distill", ["finetune"],
                  not distill_todo),
            array("sweep-train", train_todo or [p.task for p in first], "train", ["prepare", "sweep-distill"],
                  not train_todo, "--wait")]
    if extra_ids(cfg.sweep):
        everything = extra_ids(cfg.sweep)
        if train_todo:  # the best temperature is not known yet: every extra point runs
            extra_distill = extra_train = everything
        else:
            records = [read_record(rd, p, stage_fingerprint(*depends.student(point_config(cfg, p), rd, arch,
                                                                             p.source))) for p in first]
            extras = extra_points(cfg.sweep, *best_temperatures(records, cfg.sweep))
            extra_distill = [p.task for p in extras if not distilled(p)]
            extra_train = [p.task for p in extras if not measured(p)]
        jobs += [array("sweep-extra-distill", extra_distill or everything, "distill", ["finetune", "sweep-train"],
                       not extra_distill),
                 array("sweep-extra-train", extra_train or everything, "train",
                       ["prepare", "sweep-train", "sweep-extra-distill"], not extra_train, "--wait")]
    summary = Job("sweep", "sweep", [*overrides, *flags], [j.name for j in jobs], outputs=[rd.sweep])
    summary.done = (all(j.done for j in jobs) and not force
                    and up_to_date(rd.sweep, partial(depends.sweep, cfg, rd)))
    return [*jobs, summary]


def waiting_for(job: Job, jobs: Sequence[Job]) -> list[str]:
    """The jobs that run and ``job`` waits for (finished ones are no dependency)."""
    running = {j.name for j in jobs if not j.done}
    return [name for name in job.after if name in running]


def job_state(job: Job) -> str:
    """``done`` (up to date), ``running`` (a live process holds one of its outputs), ``stale`` (an output exists,
    made from other settings or inputs, or something it waits for reruns) or ``missing`` (nothing written yet)."""
    if job.done:
        return "done"
    if any(in_use(folder) for folder in job.outputs):
        return "running"
    return "stale" if any(read_manifest(folder) is not None for folder in job.outputs) else "missing"


def describe_states(jobs: Sequence[Job]) -> str:
    """One line per job: its state (:func:`job_state`), the array tasks still to run, the folders it writes."""
    rows = [f"{'job':24s} {'state':8s} {'to run':>6s}  output"]
    for job in jobs:
        todo = "-" if job.done or job.tasks is None else f"{len(job.tasks)}"
        where = ", ".join(str(f) for f in job.outputs[:2]) + (" ..." if len(job.outputs) > 2 else "")
        rows.append(f"{job.name:24s} {job_state(job):8s} {todo:>6s}  {where}")
    return "\n".join(rows)


def describe_chain(jobs: Sequence[Job]) -> str:
    """The plan as a table: job, array size, the jobs it waits for."""
    rows = [f"{'job':24s} {'array':>5s}  after"]
    for job in jobs:
        after = ", ".join(waiting_for(job, jobs)) or "-"
        size = len(job.tasks) if job.tasks is not None else "-"
        rows.append(f"{job.name:24s} {size:>5}  {'(up to date: not run)' if job.done else after}")
    return "\n".join(rows)
