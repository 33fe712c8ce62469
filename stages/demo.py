"""Run every stage on one config (what `make demo` calls) and say where the results are.

``--jobs N`` (default: the CPUs this process may use, at most 4) runs the chain in lanes (:mod:`pipeline.lanes`):
after `prepare`, the teacher (finetune, then each distillation) runs beside the students trained on the ground
truth, which need no teacher; then the students of the distilled datasets are spread over the lanes; then the
summary and the report. ``--jobs 1`` runs the same steps one after another.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import Config
from pipeline.cpus import usable_cpus
from pipeline.lanes import Step, balance, run_lanes, stage_step
from stages import prepare, report, students
from stages.cli import stage_main, waits

MAX_JOBS = 4
# relative training time of one student on a CPU (the attention GRU runs a Python loop over the words)
STUDENT_COST = {"resnet101_attn_gru": 3.0, "vit_transformer": 2.0}
Model = tuple[str, str]  # (architecture, caption source)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=None,
                        help=f"parallel lanes (default: the CPUs this process may use, at most {MAX_JOBS})")


def run(cfg: Config, args: argparse.Namespace) -> None:
    prepare.run(cfg, args)
    flags = [flag for flag, on in (("--force", args.force), ("--wait", waits(args))) if on]

    def step(name: str, stage: str, *extra: str) -> Step:
        return stage_step(name, stage, args.config, args.overrides, *extra, *flags)

    def student_steps(models: list[Model]) -> list[Step]:  # one `students` command per caption source
        by_source: dict[str, list[str]] = {}
        for arch, source in models:
            by_source.setdefault(source, []).append(arch)
        return [step(f"students {source}: {', '.join(archs)}", "students", f"students.archs=[{','.join(archs)}]",
                     f"students.sources=[{source}]") for source, archs in by_source.items()]

    def lanes_of(models: list[Model], lanes: int) -> list[list[Step]]:
        return [student_steps(lane) for lane in balance(models, lanes, lambda m: STUDENT_COST.get(m[0], 1.0))]

    teacher = [step("finetune", "finetune")] + [
        step(f"distill {name}", "distill", f"distill.name={name}", f"distill.temperature={t}")
        for name, t in cfg.distill.temperatures.items()]
    sources = cfg.students.sources or ["gt", *cfg.distill.temperatures]
    models = [(a, s) for s in sources for a in cfg.students.archs]
    jobs, cpus, logs = max(1, args.jobs or min(MAX_JOBS, usable_cpus())), usable_cpus(), cfg.run_dir / "logs"
    if jobs == 1:
        run_lanes([teacher + student_steps(models)], logs, cpus)
    else:  # the teacher beside the ground-truth students, then the distilled sources' students on every lane
        run_lanes([teacher, *lanes_of([m for m in models if m[1] == "gt"], jobs - 1)], logs, cpus)
        run_lanes(lanes_of([m for m in models if m[1] != "gt"], jobs), logs, cpus)
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
