"""The pipeline as Slurm batch jobs: render sbatch scripts, submit them with ``afterok`` dependencies, poll states.

Chain: prepare -> finetune (1..N nodes) -> for each temperature: distill array over shards -> merge -> students
array over (architecture x source) -> report. Scripts are written into ``<run_dir>/slurm/`` before anything is
submitted, so they can be read and resubmitted by hand; ``jobs.json`` records the submitted ids.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir, atomic_write_json, atomic_write_text, read_manifest

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
    done: bool = False  # output already finished: not submitted


def _stage_args(config: Path, overrides: list[str], *extra: str) -> str:
    """A stage's command-line arguments: the config file, the overrides (shell-quoted), then ``extra`` as is."""
    return " ".join([f"--config {shlex.quote(str(config))}", *map(shlex.quote, overrides), *extra])


def _stage(module: str, config: Path, overrides: list[str], *extra: str) -> str:
    return f"python -m stages.{module} {_stage_args(config, overrides, *extra)}"


def _finetune_command(cfg: Config, config: Path, overrides: list[str]) -> str:
    nodes, gpus = cfg.slurm.nodes.get("finetune", 1), cfg.slurm.gpus_per_node
    if nodes > 1:  # one torchrun per node, rendezvous on the first node
        return ('head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
                f"srun --ntasks-per-node=1 torchrun --nnodes={nodes} --nproc_per_node={max(gpus, 1)} "
                '--rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$head:29500" '
                f"-m stages.finetune {_stage_args(config, overrides)}")
    if gpus > 1:
        return (f"python -m deepspeed.launcher.runner --num_gpus {gpus} --module stages.finetune "
                f"{_stage_args(config, overrides)}")
    return _stage("finetune", config, overrides)


def plan_chain(cfg: Config, config: Path, overrides: list[str], force: bool = False) -> list[Job]:
    """The jobs of the whole pipeline; those whose outputs are finished are marked done (unless ``force``)."""
    rd = RunDir(cfg.run_dir)
    finished = (lambda folder: False) if force else (lambda folder: read_manifest(folder) is not None)
    gpus = cfg.slurm.gpus_per_node
    jobs = [Job("prepare", _stage("prepare", config, overrides), done=finished(rd.data)),
            Job("finetune", _finetune_command(cfg, config, overrides), ["prepare"],
                nodes=cfg.slurm.nodes.get("finetune", 1), gpus=gpus, done=finished(rd.teacher))]
    sources = cfg.students.sources or ["gt", *cfg.distill.temperatures]
    datasets = []  # the job that finishes each distilled dataset
    for name, temperature in cfg.distill.temperatures.items():
        pinned = [*overrides, f"distill.temperature={temperature}", f"distill.name={name}"]
        shards = cfg.slurm.distill_shards
        shard_arg = '--shard "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"' if shards > 1 else ""
        done = finished(rd.distill(name))
        jobs.append(Job(f"distill-{name}", _stage("distill", config, pinned, shard_arg).rstrip(), ["finetune"],
                        array=shards if shards > 1 else None, gpus=min(gpus, 1), done=done))
        if shards > 1:
            jobs.append(Job(f"merge-{name}", _stage("distill", config, pinned, "--merge"), [f"distill-{name}"],
                            done=done))
        datasets.append(jobs[-1].name)
    combos = [(a, s) for s in sources for a in cfg.students.archs]
    pairs = " ".join(shlex.quote(f"{a} {s}") for a, s in combos)
    student_cmd = (f"combos=({pairs})\nset -- ${{combos[$SLURM_ARRAY_TASK_ID]}}\n"
                   + _stage("students", config, overrides, '"students.archs=[$1]"', '"students.sources=[$2]"'))
    jobs.append(Job("students", student_cmd, ["prepare", *datasets], array=len(combos), gpus=min(gpus, 1),
                    done=all(finished(rd.students / f"{a}__{s}") for a, s in combos)))
    jobs.append(Job("report", _stage("report", config, overrides), ["students"], done=finished(rd.report)))
    return jobs


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


def write_scripts(cfg: Config, jobs: list[Job], workdir: Path) -> dict[str, Path]:
    folder = RunDir(cfg.run_dir).root.resolve() / "slurm"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, job in enumerate(jobs):
        paths[job.name] = folder / f"{i:02d}-{job.name}.sbatch"
        atomic_write_text(paths[job.name], render_script(cfg, job, folder / "logs", workdir))
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
        deps = [ids[name] for name in job.after if name in ids]
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
