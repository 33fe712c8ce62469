"""`make check`: the preflight of a run (:mod:`pipeline.workflows.preflight`): dataset, teacher checkpoint, encoder
weights, Java, disk space. Prints one line per problem and exits 1 when there is any; `make submit` runs it first."""

from __future__ import annotations

import argparse
import sys

from pipeline.core.config import Config
from pipeline.workflows.preflight import PreflightError, preflight
from stages.cli import stage_main


def run(cfg: Config, args: argparse.Namespace) -> None:
    problems = preflight(cfg)
    if problems:
        raise PreflightError(f"{len(problems)} problem(s), nothing will run until they are fixed:\n"
                             + "\n".join(problems))
    print(f"preflight: ready ({args.config}: data.root {cfg.data.root}, teacher.model {cfg.teacher.model})")


if __name__ == "__main__":
    sys.exit(stage_main("check", run, torch_threads=False))
