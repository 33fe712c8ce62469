"""`make status`: the submitted chain's jobs and their Slurm states (exit 1 when a job failed); on a run with nothing
submitted (no ``<run_dir>/slurm/jobs.json``), each job's state from the run folder: done, stale, missing, running.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.errors import PipelineError
from pipeline.orchestration.plan import describe_states, plan_chain
from pipeline.orchestration.slurm import FAILED_STATES, job_states, jobs_file, load_jobs
from stages.cli import stage_main


def local_states(cfg: Config, args: argparse.Namespace) -> None:
    """Each job of the chain `make submit` would plan, with its state read from manifests, up-to-date keys, locks."""
    jobs = plan_chain(cfg, Path(args.config), args.overrides, shards=cfg.slurm.distill_shards, sweep=cfg.slurm.sweep)
    print(f"{cfg.run_dir}: nothing submitted to Slurm (no {jobs_file(cfg)}); state of each job from the run folder")
    print(describe_states(jobs))


def run(cfg: Config, args: argparse.Namespace) -> dict[str, list[tuple[str, str]]]:
    if not jobs_file(cfg).is_file():
        local_states(cfg, args)
        return {}
    states = job_states(load_jobs(cfg))
    for name, tasks in states.items():
        summary = ", ".join(f"{job_id}:{state}" for job_id, state in tasks)
        print(f"{name:24s} {summary}")
    failed = [name for name, tasks in states.items() if any(state in FAILED_STATES for _, state in tasks)]
    if failed:
        raise PipelineError(f"failed or cancelled: {', '.join(failed)} (logs in {cfg.run_dir / 'slurm' / 'logs'})")
    return states


if __name__ == "__main__":
    sys.exit(stage_main("status", run, torch_threads=False))
