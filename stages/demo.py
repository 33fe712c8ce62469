"""Run every stage on one config (what `make demo` calls) and say where the results are.

``--jobs N`` (default: the CPUs this process may use, at most 4) runs the chain's steps on N parallel workers
(:mod:`pipeline.scheduler`): after `prepare`, the teacher's finetune and distillations run beside the students of the
ground truth (which need no teacher), and each distilled source's students start as soon as its dataset exists;
then the summary and the report. ``--jobs 1`` runs the same steps one after another. The steps' scorers share one
METEOR jar (:class:`pipeline.metrics.MeteorService`).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import Config
from pipeline.cpus import usable_cpus
from pipeline.metrics import MeteorService
from pipeline.scheduler import Step, run_steps, stage_step
from stages import prepare, report, students
from stages.cli import stage_main, waits

MAX_JOBS = 4
# relative training time of one student on a CPU (the attention GRU runs a Python loop over the words): the costly
# ones start first
STUDENT_COST = {"resnet101_attn_gru": 3.0, "vit_transformer": 2.0}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=None,
                        help=f"parallel workers (default: the CPUs this process may use, at most {MAX_JOBS})")


def chain_steps(cfg: Config, args: argparse.Namespace) -> tuple[list[Step], list[str]]:
    """The chain after `prepare` as prioritised steps (teacher first, then students), and the students' sources."""
    flags = [flag for flag, on in (("--force", args.force), ("--wait", waits(args))) if on]

    def step(name: str, stage: str, *extra: str, after: tuple[str, ...] = ()) -> Step:
        return stage_step(name, stage, args.config, args.overrides, *extra, *flags, after=after)

    sources = cfg.students.sources or ["gt", *cfg.distill.temperatures]
    steps = [step("finetune", "finetune")] + [
        step(f"distill {name}", "distill", f"distill.name={name}", f"distill.temperature={t}", after=("finetune",))
        for name, t in cfg.distill.temperatures.items() if name in sources]
    archs = sorted(cfg.students.archs, key=lambda a: -STUDENT_COST.get(a, 1.0))
    steps += [step(f"student {arch} on {source}", "students", f"students.archs=[{arch}]", f"students.sources=[{source}]",
                   after=(f"distill {source}",) if source in cfg.distill.temperatures else ()) for source in sources for arch in archs]
    return steps, sources


def run(cfg: Config, args: argparse.Namespace) -> None:
    prepare.run(cfg, args)
    steps, sources = chain_steps(cfg, args)
    with MeteorService():  # one METEOR jar for every step's scorer, not one per student step
        run_steps(steps, args.jobs or min(MAX_JOBS, usable_cpus()), cfg.run_dir / "logs", usable_cpus())
        summary = cfg.model_copy(deep=True)
        summary.students.sources = sources
        students.run(summary, argparse.Namespace(**{**vars(args), "force": False}))  # all trained: tables only
    report.run(cfg, args)
    print(f"\nDemo finished. Results: {cfg.run_dir.resolve()}\n  prepared data: {cfg.run_dir / 'data'}\n"
          f"  teacher adapter: {cfg.run_dir / 'teacher' / 'adapter'}\n"
          f"  distilled datasets: {', '.join(str(cfg.run_dir / 'distill' / n) for n in cfg.distill.temperatures)}\n"
          f"  students: {cfg.run_dir / 'students'}\n"
          f"  report (tables, plots, gallery): {cfg.run_dir / 'report' / 'results.md'}")


if __name__ == "__main__":
    sys.exit(stage_main("demo", run, add_args))
