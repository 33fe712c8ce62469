"""Run every stage in order on one config (what `make demo` calls) and say where the results are."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import Config
from stages import finetune, prepare
from stages.cli import stage_main

log = logging.getLogger("demo")


def run(cfg: Config, args: argparse.Namespace) -> None:
    prepare.run(cfg, args)
    finetune.run(cfg, args)
    print(f"\nDemo finished. Results: {cfg.run_dir.resolve()}\n  prepared data: {cfg.run_dir / 'data'}\n"
          f"  teacher adapter: {cfg.run_dir / 'teacher' / 'adapter'}")


if __name__ == "__main__":
    sys.exit(stage_main("demo", run))
