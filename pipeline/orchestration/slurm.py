"""The chain (:mod:`pipeline.orchestration.plan`) as Slurm batch jobs: sbatch scripts, submission with ``afterok``
dependencies, job states.

Scripts and ``submit.sh`` (the same chain by hand) are written into ``<run_dir>/slurm/`` before anything is submitted;
``jobs.json`` records the submitted ids.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.errors import PipelineError
from pipeline.core.rundir import RunDir, atomic_write_json, atomic_write_text
from pipeline.orchestration.plan import Job, waiting_for

FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class SlurmError(PipelineError):
    pass


def _gpus(cfg: Config, job: Job) -> int:
    """GPUs per node: every one for finetune; for a job that generates with vLLM, its tensor-parallel size; else one."""
    if job.kind == "finetune":
        return cfg.slurm.gpus_per_node
    engine = cfg.distill.vllm.tensor_parallel_size if cfg.distill.engine == "vllm" and job.stage in (
        "distill", "sweep") else 1
    return min(cfg.slurm.gpus_per_node, engine) * (job.kind == "gpu")


@dataclass(frozen=True)
class Resources:
    """What one job asks Slurm for (per node)."""

    partition: str | None
    gpus: int
    cpus: int
    mem: str | None
    time: str


def resources(cfg: Config, job: Job) -> Resources:
    """``job``'s request: its kind's defaults (cpu: no GPU, ``cpu_mem``, ``cpu_partition``; gpu: one GPU;
    finetune: every GPU of a node and ``cpus_per_task`` CPUs for each), then ``slurm.resources.<kind>``, then
    ``slurm.resources.<job name>`` (or of its first word, e.g. ``students``), each key it sets winning."""
    s = cfg.slurm
    gpus = _gpus(cfg, job)
    default = {"partition": (s.cpu_partition or s.partition) if job.kind == "cpu" else s.partition, "gpus": gpus,
               "cpus": s.cpus_per_task * max(gpus, 1) if job.kind == "finetune" else s.cpus_per_task,
               "mem": s.cpu_mem if job.kind == "cpu" else s.mem,
               "time": s.time.get(job.name.split("-")[0], s.time.get("default", "04:00:00"))}
    for key in (job.kind, job.name.split("-")[0], job.name):
        if key in s.resources:
            default.update(s.resources[key].model_dump(exclude_none=True))
    return Resources(**default)


def job_name(cfg: Config, job: Job) -> str:
    """The Slurm job name: ``fd-<run folder>-<job>``, so two runs' jobs never share a name."""
    return f"fd-{Path(cfg.run_dir).name}-{job.name}"


def _nodes(cfg: Config, job: Job) -> int:
    return cfg.slurm.nodes.get("finetune", 1) if job.kind == "finetune" else 1


def job_command(cfg: Config, job: Job, config: Path) -> str:
    """The shell lines of ``job``: its stage command (an array task's args picked by ``SLURM_ARRAY_TASK_ID``),
    started by DeepSpeed's launcher on every GPU of a node, or by torchrun on each of several nodes, for finetune."""
    args = " ".join([f"--config {shlex.quote(str(config))}", *map(shlex.quote, job.args)])
    lines = []
    if job.tasks is not None:
        tasks = " ".join(shlex.quote(" ".join(map(shlex.quote, task))) for task in job.tasks)
        lines += [f"tasks=({tasks})", 'eval "task=(${tasks[$SLURM_ARRAY_TASK_ID]})"']
        args += ' "${task[@]}"'
    nodes, gpus = _nodes(cfg, job), resources(cfg, job).gpus
    if nodes > 1:  # one torchrun per node, rendezvous on the first node
        lines += ['head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                  f"srun --ntasks-per-node=1 torchrun --nnodes={nodes} --nproc_per_node={max(gpus, 1)} "
                  '--rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$head:29500" '
                  f"-m stages.{job.stage} {args}"]
    elif job.kind == "finetune" and gpus > 1:
        lines.append(f"python -m deepspeed.launcher.runner --num_gpus {gpus} --module stages.{job.stage} {args}")
    else:
        lines.append(f"python -m stages.{job.stage} {args}")
    return "\n".join(lines)


# on USR1 (slurm.signal_seconds before the time limit, or on preemption) the stage is stopped and the job requeued:
# the stage resumes from its checkpoints when the job starts again
REQUEUE_TRAP = ["requeue() {",
                '  echo "USR1: stopping the stage and requeueing this job; it resumes from its checkpoints" >&2',
                '  kill -TERM "$child" 2>/dev/null || true',
                '  wait "$child" || true',
                '  scontrol requeue "${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}"'
                '"${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}"',
                "  exit 0",
                "}",
                "trap requeue USR1"]


def render_script(cfg: Config, job: Job, config: Path, log_dir: Path, workdir: Path) -> str:
    """The sbatch script of ``job``: its resources (:func:`resources`), a name with the run's, ``--requeue`` and
    a signal before the time limit that requeues it (``slurm.requeue``), an array throttle (``slurm.array_throttle``).
    """
    s, res, nodes = cfg.slurm, resources(cfg, job), _nodes(cfg, job)
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name(cfg, job)}",
             f"#SBATCH --output={log_dir}/{job.name}-%A{'_%a' if job.tasks is not None else ''}.out",
             f"#SBATCH --time={res.time}", f"#SBATCH --cpus-per-task={res.cpus}"]
    if nodes > 1:
        lines += [f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1"]
    if res.gpus:
        lines.append(f"#SBATCH --gpus-per-node={res.gpus}")
    if job.tasks is not None:
        throttle = f"%{s.array_throttle}" if s.array_throttle else ""
        lines.append(f"#SBATCH --array=0-{len(job.tasks) - 1}{throttle}")
    lines += [f"#SBATCH --partition={res.partition}"] if res.partition else []
    lines += [f"#SBATCH --account={s.account}"] if s.account else []
    lines += [f"#SBATCH --mem={res.mem}"] if res.mem else []
    trap = s.requeue and s.signal_seconds > 0
    lines += ["#SBATCH --requeue"] if s.requeue else []
    lines += [f"#SBATCH --signal=B:USR1@{s.signal_seconds}"] if trap else []
    lines += [f"#SBATCH {a}" for a in s.extra_args]
    *prelude, command = job_command(cfg, job, config).split("\n")
    run = [f"{command} &", "child=$!", 'wait "$child"'] if trap else [command]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(workdir))}", *s.setup, *(REQUEUE_TRAP if trap else []),
              *prelude, *run, ""]
    return "\n".join(lines)


def render_submit_script(jobs: list[Job], scripts: dict[str, Path]) -> str:
    """``submit.sh``: sbatch every job to be submitted, in order, with the same ``afterok`` wiring; after each one
    the ids so far go to ``jobs.json`` beside it (atomically), so ``make status`` sees a chain submitted by hand."""
    folder = next(iter(scripts.values())).parent
    lines = ["#!/bin/bash", "# The chain as `make submit` submits it, by hand: bash submit.sh (prints names and ids,",
             "# records them in jobs.json for `make status`)",
             *(f"# {job.name}: up to date when planned, not submitted" for job in jobs if job.done),
             "set -euo pipefail", "declare -A id", "names=()", f"jobs={shlex.quote(str(folder / 'jobs.json'))}",
             "record() {",
             '  local out="{" sep="" name',
             '  for name in "${names[@]}"; do',
             '    out+=$(printf \'%s"%s": "%s"\' "$sep" "$name" "${id[$name]}"); sep=", "',
             "  done",
             '  printf \'%s}\\n\' "$out" > "$jobs.tmp.$$" && mv "$jobs.tmp.$$" "$jobs"',
             "}"]
    for job in jobs:
        if job.done:
            continue
        deps = ":".join(f"${{id[{name}]}}" for name in waiting_for(job, jobs))
        dependency = f" --dependency=afterok:{deps}" if deps else ""
        script = shlex.quote(str(scripts[job.name]))
        lines += [f"id[{job.name}]=$(sbatch --parsable{dependency} {script} | cut -d';' -f1)",
                  f"names+=({job.name})", "record", f'echo "{job.name} ${{id[{job.name}]}}"']
    return "\n".join(lines) + "\n"


def write_scripts(cfg: Config, jobs: list[Job], config: Path, workdir: Path) -> dict[str, Path]:
    """Write one sbatch script per job and ``submit.sh`` into ``<run_dir>/slurm/`` (older numbered scripts go)."""
    folder = RunDir(cfg.run_dir).root.resolve() / "slurm"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    paths = {job.name: folder / f"{i:02d}-{job.name}.sbatch" for i, job in enumerate(jobs)}
    for old in set(folder.glob("[0-9][0-9]-*.sbatch")) - set(paths.values()):
        old.unlink()
    for job in jobs:
        atomic_write_text(paths[job.name], render_script(cfg, job, config, folder / "logs", workdir))
    atomic_write_text(folder / "submit.sh", render_submit_script(jobs, paths))
    (folder / "submit.sh").chmod(0o755)
    return paths


def _run(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found: Slurm client tools are needed (Debian: apt-get install slurm-client)"
                         ) from None
    if res.returncode != 0:
        raise SlurmError(f"{' '.join(cmd[:2])} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def submit(cfg: Config, jobs: list[Job], scripts: dict[str, Path]) -> dict[str, str]:
    """sbatch every job not done, in order, with afterok on the submitted jobs it needs; returns name -> id."""
    ids: dict[str, str] = {}
    for job in jobs:
        if job.done:
            continue
        deps = [ids[name] for name in waiting_for(job, jobs)]
        cmd = ["sbatch", "--parsable"] + ([f"--dependency=afterok:{':'.join(deps)}"] if deps else [])
        ids[job.name] = _run([*cmd, str(scripts[job.name])]).strip().split(";")[0]
    atomic_write_json(jobs_file(cfg), ids)
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


def jobs_file(cfg: Config) -> Path:
    """``<run_dir>/slurm/jobs.json``: the ids of the submitted jobs (by `make submit` or ``submit.sh``)."""
    return RunDir(cfg.run_dir).root / "slurm" / "jobs.json"


def load_jobs(cfg: Config) -> dict[str, str]:
    path = jobs_file(cfg)
    if not path.is_file():
        raise SlurmError(f"{path} not found: nothing submitted for this run yet (make submit)")
    return json.loads(path.read_text())
