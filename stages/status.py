"""`make status`: the submitted chain's jobs and their states; exits 1 when a job failed."""

from __future__ import annotations

import argparse
import sys

from pipeline.core.config import Config
from pipeline.core.errors import PipelineError
from pipeline.orchestration.slurm import FAILED_STATES, job_states, load_jobs
from stages.cli import stage_main


def run(cfg: Config, args: argparse.Namespace) -> dict[str, list[tuple[str, str]]]:
    states = job_states(load_jobs(cfg))
    for name, tasks in states.items():
        summary = ", ".join(f"{job_id}:{state}" for job_id, state in tasks)
        print(f"{name:24s} {summary}")
    failed = [name for name, tasks in states.items() if any(state in FAILED_STATES for _, state in tasks)]
    if failed:
        raise PipelineError(f"failed or cancelled: {', '.join(failed)} (logs in {cfg.run_dir / 'slurm' / 'logs'})")
    return states


if __name__ == "__main__":
    sys.exit(stage_main("status", run))
