"""Run every stage in order on one config (what `make demo` calls) and say where the results are."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import Config
from pipeline.teacher.dataset import distill_dataset
from stages import finetune, prepare, report, students
from stages.cli import stage_main, waits


def with_temperature(cfg: Config, name: str, temperature: float) -> Config:
    """A copy of ``cfg`` that distils the dataset ``name`` at ``temperature``."""
    out = cfg.model_copy(deep=True)
    out.distill.name, out.distill.temperature = name, temperature
    return out


def run(cfg: Config, args: argparse.Namespace) -> None:
    prepare.run(cfg, args)
    finetune.run(cfg, args)
    for name, temperature in cfg.distill.temperatures.items():
        distill_dataset(with_temperature(cfg, name, temperature), force=args.force, wait=waits(args))
    students.run(cfg, args)
    report.run(cfg, args)
    print(f"\nDemo finished. Results: {cfg.run_dir.resolve()}\n  prepared data: {cfg.run_dir / 'data'}\n"
          f"  teacher adapter: {cfg.run_dir / 'teacher' / 'adapter'}\n"
          f"  distilled datasets: {', '.join(str(cfg.run_dir / 'distill' / n) for n in cfg.distill.temperatures)}\n"
          f"  students: {cfg.run_dir / 'students'}\n"
          f"  report (tables, plots, gallery): {cfg.run_dir / 'report' / 'results.md'}")


if __name__ == "__main__":
    sys.exit(stage_main("demo", run))
