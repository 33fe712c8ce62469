"""Run every stage on one config (what `make demo` calls) and say where the results are.

The chain is :func:`pipeline.orchestration.plan.plan_chain`'s, the one `make submit` sends to Slurm, run here by the
local scheduler (:mod:`pipeline.orchestration.scheduler`) on ``--jobs N`` parallel workers (default: the CPUs this
process may use, at most 4): after `prepare`, the teacher's finetune and distillations run beside the students of the
ground truth (which need no teacher), and each distilled source's students start as soon as its dataset exists; the
report last. ``--jobs 1`` runs the same steps one after another. The steps' scorers share one METEOR jar
(:class:`pipeline.evaluation.metrics.MeteorService`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.cpus import usable_cpus
from pipeline.evaluation.metrics import MeteorService
from pipeline.orchestration.plan import plan_chain
from pipeline.orchestration.scheduler import local_steps, run_steps
from stages.cli import stage_main, waits

MAX_JOBS = 4


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=None,
                        help=f"parallel workers (default: the CPUs this process may use, at most {MAX_JOBS})")


def run(cfg: Config, args: argparse.Namespace) -> None:
    jobs = plan_chain(cfg, Path(args.config), args.overrides, force=args.force,
                      flags=["--wait"] if waits(args) else [])
    with MeteorService():  # one METEOR jar for every step's scorer, not one per student step
        run_steps(local_steps(jobs, args.config), args.jobs or min(MAX_JOBS, usable_cpus()), cfg.run_dir / "logs",
                  usable_cpus())
    print(f"\nDemo finished. Results: {cfg.run_dir.resolve()}\n  prepared data: {cfg.run_dir / 'data'}\n"
          f"  teacher adapter: {cfg.run_dir / 'teacher' / 'adapter'}\n"
          f"  distilled datasets: {', '.join(str(cfg.run_dir / 'distill' / n) for n in cfg.distill.temperatures)}\n"
          f"  students: {cfg.run_dir / 'students'}\n"
          f"  report (tables, plots, gallery): {cfg.run_dir / 'report' / 'results.md'}")


if __name__ == "__main__":
    sys.exit(stage_main("demo", run, add_args))
