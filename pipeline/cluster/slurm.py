"""The pipeline as Slurm batch jobs: render sbatch scripts, submit them with ``afterok`` dependencies, poll states.

Chain: prepare -> finetune (1..N nodes) -> for each temperature: [reset ->] distill array over shards -> merge;
prepare -> features (the frozen encoders' caches) -> students array over (architecture x source) -> report; with
``slurm.sweep`` the temperature sweep's arrays (:mod:`pipeline.cluster.sweep`) before the report. A job
is left out when its stage's own rule (:mod:`pipeline.depends`) finds its output up to date and no job it depends
on is submitted. Scripts and ``submit.sh`` (the same chain by hand) are written into ``<run_dir>/slurm/`` before
anything is submitted; ``jobs.json`` records the submitted ids.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pipeline import depends
from pipeline.config import Config, load_config
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir, atomic_write_json, atomic_write_text, is_up_to_date, read_manifest

SHARD_ARG = '--shard "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"'
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class SlurmError(PipelineError):
    pass


@dataclass
class Job:
    name: str  # unique within the chain, also the file name
    command: str  # shell lines run by the job
    after: list[str] = field(default_factory=list)  # names this job depends on (afterok)
    array: int | None = None  # number of array tasks
    nodes: int = 1
    gpus: int = 0
    done: bool = False  # output up to date: not submitted


def _stage_args(config: Path, overrides: list[str], *extra: str) -> str:
    """A stage's command-line arguments: the config file, the overrides (shell-quoted), then ``extra`` as is."""
    return " ".join([f"--config {shlex.quote(str(config))}", *map(shlex.quote, overrides), *extra])


def _stage(module: str, config: Path, overrides: list[str], *extra: str) -> str:
    return f"python -m stages.{module} {_stage_args(config, overrides, *extra)}"


def _finetune_command(cfg: Config, config: Path, overrides: list[str], *extra: str) -> str:
    nodes, gpus = cfg.slurm.nodes.get("finetune", 1), cfg.slurm.gpus_per_node
    if nodes > 1:  # one torchrun per node, rendezvous on the first node
        return ('head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
                f"srun --ntasks-per-node=1 torchrun --nnodes={nodes} --nproc_per_node={max(gpus, 1)} "
                '--rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$head:29500" '
                f"-m stages.finetune {_stage_args(config, overrides, *extra)}")
    if gpus > 1:
        return (f"python -m deepspeed.launcher.runner --num_gpus {gpus} --module stages.finetune "
                f"{_stage_args(config, overrides, *extra)}")
    return _stage("finetune", config, overrides, *extra)


def _up_to_date(folder: Path, key: Callable[[], depends.Depends]) -> bool:
    """The stage's own rule: ``folder`` holds a finished output of exactly the config and inputs ``key`` gives."""
    if read_manifest(folder) is None:
        return False
    try:
        return is_up_to_date(folder, *key())
    except (PipelineError, OSError):  # an input is missing or unreadable: the job runs and its stage says what
        return False


def plan_chain(cfg: Config, config: Path, overrides: list[str], force: bool = False) -> list[Job]:
    """The jobs of the whole pipeline in submission order; ``cfg`` is what ``config`` + ``overrides`` load.

    A job is marked done (not submitted) only when no job it depends on is submitted and its stage's up-to-date
    rule holds for the config the job loads (its own overrides included). ``force`` submits every job with
    ``--force``, except the distill shards: their reset job wipes the folder once for all of them.
    """
    rd = RunDir(cfg.run_dir)
    gpus = cfg.slurm.gpus_per_node
    flags = ["--force"] if force else []
    jobs: dict[str, Job] = {}

    def add(job: Job, folder: Path, key: Callable[[], depends.Depends]) -> Job:
        job.done = not force and all(jobs[name].done for name in job.after) and _up_to_date(folder, key)
        jobs[job.name] = job
        return job

    add(Job("prepare", _stage("prepare", config, overrides, *flags)), rd.data, partial(depends.prepare, cfg))
    add(Job("finetune", _finetune_command(cfg, config, overrides, *flags), ["prepare"],
            nodes=cfg.slurm.nodes.get("finetune", 1), gpus=gpus), rd.teacher, partial(depends.finetune, cfg, rd))
    datasets: dict[str, Job] = {}  # distilled dataset name -> the job that finishes it
    shards = cfg.slurm.distill_shards
    for name, temperature in cfg.distill.temperatures.items():
        pinned = [*overrides, f"distill.temperature={temperature}", f"distill.name={name}"]
        folder = rd.distill(name)
        key = partial(depends.distill, load_config(config, pinned), rd)
        if shards == 1:
            datasets[name] = add(Job(f"distill-{name}", _stage("distill", config, pinned, *flags), ["finetune"],
                                     gpus=min(gpus, 1)), folder, key)
            continue
        add(Job(f"reset-{name}", _stage("distill", config, pinned, "--reset", *flags), ["finetune"]), folder, key)
        add(Job(f"distill-{name}", _stage("distill", config, pinned, SHARD_ARG), [f"reset-{name}"], array=shards,
                gpus=min(gpus, 1)), folder, key)
        datasets[name] = add(Job(f"merge-{name}", _stage("distill", config, pinned, "--merge", *flags),
                                 [f"distill-{name}"]), folder, key)

    sources = cfg.students.sources or ["gt", *cfg.distill.temperatures]
    combos = [(a, s) for s in sources for a in cfg.students.archs]
    stale = []  # the (arch, source) models to train: an input job is submitted or the model is not up to date
    for arch, source in combos:
        dataset = depends.source_dataset(source)  # gt+<name> waits for <name> too
        upstream = [jobs["prepare"], *([datasets[dataset]] if dataset in datasets else [])]
        pinned = [*overrides, f"students.archs=[{arch}]", f"students.sources=[{source}]"]
        key = partial(depends.student, load_config(config, pinned), rd, arch, source)
        if force or not all(j.done for j in upstream) or not _up_to_date(rd.students / f"{arch}__{source}", key):
            stale.append((arch, source))
    todo = stale or combos  # the script of a finished students job still lists every model
    todo_sources = {depends.source_dataset(s) for _, s in todo}
    after = ["prepare", *(job.name for s, job in datasets.items() if s in todo_sources)]
    if not cfg.students.encoder.finetune:  # frozen encoders: their feature caches are built once, before the array
        archs = list(dict.fromkeys(a for a, _ in todo))
        feature_args = [*overrides, f"students.archs=[{','.join(archs)}]"]
        jobs["features"] = Job("features", _stage("students", config, feature_args, "--features-only", *flags),
                               ["prepare"], gpus=min(gpus, 1), done=not stale)
        after.insert(1, "features")
    pairs = " ".join(shlex.quote(f"{a} {s}") for a, s in todo)
    student_cmd = (f"combos=({pairs})\nset -- ${{combos[$SLURM_ARRAY_TASK_ID]}}\n"
                   + _stage("students", config, overrides, '"students.archs=[$1]"', '"students.sources=[$2]"',
                            *flags))
    jobs["students"] = Job("students", student_cmd, after, array=len(todo), gpus=min(gpus, 1), done=not stale)
    if cfg.slurm.sweep:
        from pipeline.cluster.sweep import plan_sweep

        jobs.update((j.name, j) for j in plan_sweep(cfg, config, overrides, prepared=jobs["prepare"].done,
                                                     finetuned=jobs["finetune"].done, force=force))
    add(Job("report", _stage("report", config, overrides, *flags),
            ["students", *(j.name for j in datasets.values()), *(["sweep"] if cfg.slurm.sweep else [])]),
        rd.report, partial(depends.report, cfg, rd))
    return list(jobs.values())


def render_script(cfg: Config, job: Job, log_dir: Path, workdir: Path) -> str:
    s = cfg.slurm
    lines = ["#!/bin/bash", f"#SBATCH --job-name=fd-{job.name}",
             f"#SBATCH --output={log_dir}/{job.name}-%A{'_%a' if job.array else ''}.out",
             f"#SBATCH --time={s.time.get(job.name.split('-')[0], s.time.get('default', '04:00:00'))}",
             f"#SBATCH --cpus-per-task={s.cpus_per_task}"]
    if job.nodes > 1:
        lines += [f"#SBATCH --nodes={job.nodes}", "#SBATCH --ntasks-per-node=1"]
    if job.gpus:
        lines.append(f"#SBATCH --gpus-per-node={job.gpus}")
    if job.array:
        lines.append(f"#SBATCH --array=0-{job.array - 1}")
    lines += [f"#SBATCH --partition={s.partition}"] if s.partition else []
    lines += [f"#SBATCH --account={s.account}"] if s.account else []
    lines += [f"#SBATCH --mem={s.mem}"] if s.mem else []
    lines += [f"#SBATCH {a}" for a in s.extra_args]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(workdir))}", *s.setup, job.command, ""]
    return "\n".join(lines)


def parents(job: Job, jobs: list[Job]) -> list[str]:
    """The submitted jobs ``job`` waits for (``afterok``); finished ones are no dependency."""
    submitted = {j.name for j in jobs if not j.done}
    return [name for name in job.after if name in submitted]


def render_submit_script(jobs: list[Job], scripts: dict[str, Path]) -> str:
    """``submit.sh``: sbatch every job to be submitted, in order, with the same ``afterok`` wiring."""
    lines = ["#!/bin/bash", "# The chain as `make submit` submits it, by hand: bash submit.sh (prints names and ids)",
             *(f"# {job.name}: up to date when planned, not submitted" for job in jobs if job.done),
             "set -euo pipefail", "declare -A id"]
    for job in jobs:
        if job.done:
            continue
        deps = ":".join(f"${{id[{name}]}}" for name in parents(job, jobs))
        dependency = f" --dependency=afterok:{deps}" if deps else ""
        script = shlex.quote(str(scripts[job.name]))
        lines += [f"id[{job.name}]=$(sbatch --parsable{dependency} {script} | cut -d';' -f1)",
                  f'echo "{job.name} ${{id[{job.name}]}}"']
    return "\n".join(lines) + "\n"


def describe_chain(jobs: list[Job]) -> str:
    """The DAG as a table: job, array size, the submitted jobs it waits for (afterok)."""
    rows = [f"{'job':20s} {'array':>5s}  afterok"]
    for job in jobs:
        after = ", ".join(parents(job, jobs)) or "-"
        rows.append(f"{job.name:20s} {job.array or '-':>5}  {'(up to date: not submitted)' if job.done else after}")
    return "\n".join(rows)


def write_scripts(cfg: Config, jobs: list[Job], workdir: Path) -> dict[str, Path]:
    """Write one sbatch script per job and ``submit.sh`` into ``<run_dir>/slurm/`` (older numbered scripts go)."""
    folder = RunDir(cfg.run_dir).root.resolve() / "slurm"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    paths = {job.name: folder / f"{i:02d}-{job.name}.sbatch" for i, job in enumerate(jobs)}
    for old in set(folder.glob("[0-9][0-9]-*.sbatch")) - set(paths.values()):
        old.unlink()
    for job in jobs:
        atomic_write_text(paths[job.name], render_script(cfg, job, folder / "logs", workdir))
    atomic_write_text(folder / "submit.sh", render_submit_script(jobs, paths))
    (folder / "submit.sh").chmod(0o755)
    return paths


def _run(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found: Slurm client tools are needed (Debian: apt-get install slurm-client)")
    if res.returncode != 0:
        raise SlurmError(f"{' '.join(cmd[:2])} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def submit(cfg: Config, jobs: list[Job], scripts: dict[str, Path]) -> dict[str, str]:
    """sbatch every job not done, in order, with afterok on the submitted jobs it needs; returns name -> id."""
    ids: dict[str, str] = {}
    for job in jobs:
        if job.done:
            continue
        deps = [ids[name] for name in parents(job, jobs)]
        cmd = ["sbatch", "--parsable"] + ([f"--dependency=afterok:{':'.join(deps)}"] if deps else [])
        ids[job.name] = _run([*cmd, str(scripts[job.name])]).strip().split(";")[0]
    atomic_write_json(RunDir(cfg.run_dir).root / "slurm" / "jobs.json", ids)
    return ids


def _sacct(ids: list[str]) -> dict[str, list[tuple[str, str]]]:
    out = _run(["sacct", "-n", "-P", "-X", "--format=JobID,State", "-j", ",".join(ids)])
    by_id: dict[str, list[tuple[str, str]]] = {}
    for line in out.splitlines():
        job_id, state = line.split("|")[:2]
        by_id.setdefault(job_id.split("_")[0], []).append((job_id, state.split()[0]))
    return by_id


def _scontrol(job_id: str) -> list[tuple[str, str]]:
    """States from slurmctld's memory (clusters without accounting); purged jobs read UNKNOWN."""
    try:
        out = _run(["scontrol", "show", "job", "-o", job_id])
    except SlurmError:
        return [(job_id, "UNKNOWN")]
    tasks = []
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        task = fields.get("ArrayTaskId")
        tasks.append((f"{job_id}_{task}" if task else job_id, fields.get("JobState", "UNKNOWN")))
    return sorted(tasks)


def job_states(ids: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    """name -> [(job id or array task id, state)], from sacct, or scontrol where accounting is off."""
    if not ids:
        return {}
    try:
        by_id = _sacct(list(ids.values()))
    except SlurmError:
        by_id = {job_id: _scontrol(job_id) for job_id in ids.values()}
    return {name: by_id.get(job_id, [(job_id, "UNKNOWN")]) for name, job_id in ids.items()}


def load_jobs(cfg: Config) -> dict[str, str]:
    path = RunDir(cfg.run_dir).root / "slurm" / "jobs.json"
    if not path.is_file():
        raise SlurmError(f"{path} not found: nothing submitted for this run yet (make submit)")
    return json.loads(path.read_text())
