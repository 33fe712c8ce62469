"""`make submit`: the whole chain as Slurm batch jobs (scripts in <run_dir>/slurm/, ids in jobs.json).

``--dry-run`` prints the scripts without submitting. Stages whose outputs are finished are not submitted again
(``--force`` submits everything).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cluster.slurm import plan_chain, submit, write_scripts
from pipeline.config import Config
from stages.cli import stage_main

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch scripts, submit nothing")


def run(cfg: Config, args: argparse.Namespace) -> dict[str, str]:
    config = Path(args.config).resolve()
    overrides = [o for o in args.overrides if not o.startswith("run_dir=")] + [f"run_dir={cfg.run_dir.resolve()}"]
    jobs = plan_chain(cfg, config, overrides, force=args.force)
    scripts = write_scripts(cfg, jobs, PROJECT_ROOT)
    if args.dry_run:
        for job in jobs:
            print(f"# ---- {scripts[job.name]}{'  (finished: not submitted)' if job.done else ''}")
            print(scripts[job.name].read_text())
        return {}
    ids = submit(cfg, jobs, scripts)
    for job in jobs:
        print(f"{job.name:24s} {'finished, skipped' if job.done else 'job ' + ids[job.name]}")
    return ids


if __name__ == "__main__":
    sys.exit(stage_main("submit", run, add_args))
