"""`plan`: per-GPU memory and wall time of the teacher's fine-tune (ZeRO-2 and ZeRO-3, with and without gradient
checkpointing) and of a distilled dataset, from the teacher checkpoint's config.json alone (no weights, no torch).

Prints the plan; ``--json FILE`` also writes its figures there. The formulas are in ``pipeline/teacher/plan.py``
and docs/plan.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.rundir import atomic_write_text
from pipeline.teacher.plan import plan_config
from stages.cli import stage_main


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="also write the plan's figures to this JSON file")


def run(cfg: Config, args: argparse.Namespace) -> dict:
    text, figures = plan_config(cfg)
    print(text)
    if args.json:
        atomic_write_text(args.json, json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    sys.exit(stage_main("plan", run, add_args, torch_threads=False))
