"""`make submit`: the whole chain as Slurm batch jobs (scripts and submit.sh in <run_dir>/slurm/, ids in jobs.json).

The preflight (`make check`) runs first: with any problem nothing is written or submitted. ``--dry-run`` prints the
scripts and the dependency graph without submitting. A job whose output is up to date by
its stage's own rule, and none of whose dependencies is submitted, is left out; ``--force`` submits every job and
passes ``--force`` on to them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.config import Config, load_config
from pipeline.orchestration.plan import describe_chain, plan_chain
from pipeline.orchestration.slurm import submit, write_scripts
from pipeline.workflows.preflight import PreflightError, preflight
from stages.cli import stage_main

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch scripts and the DAG, submit nothing")


def run(cfg: Config, args: argparse.Namespace) -> dict[str, str]:
    config = Path(args.config).resolve()
    overrides = [o for o in args.overrides if not o.startswith("run_dir=")] + [f"run_dir={cfg.run_dir.resolve()}"]
    cfg = load_config(config, overrides)  # what the jobs load: their manifests record its absolute paths
    if problems := preflight(cfg):  # found now, not hours later in the queue
        raise PreflightError(f"{len(problems)} problem(s), nothing submitted:\n" + "\n".join(problems))
    jobs = plan_chain(cfg, config, overrides, force=args.force, shards=cfg.slurm.distill_shards, sweep=cfg.slurm.sweep)
    scripts = write_scripts(cfg, jobs, config, PROJECT_ROOT)
    folder = scripts[jobs[0].name].parent
    if args.dry_run:
        for job in jobs:
            print(f"# ---- {scripts[job.name]}{'  (up to date: not submitted)' if job.done else ''}")
            print(scripts[job.name].read_text())
        print(describe_chain(jobs))
        print(f"\nnothing submitted; by hand: bash {folder / 'submit.sh'}")
        return {}
    ids = submit(cfg, jobs, scripts)
    print(describe_chain(jobs))
    for job in jobs:
        print(f"{job.name:24s} {'finished, skipped' if job.done else 'job ' + ids[job.name]}")
    return ids


if __name__ == "__main__":
    sys.exit(stage_main("submit", run, add_args))
