"""Shared command line of every stage: ``python -m stages.<stage> --config <yaml> [--force] [key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from pipeline.config import Config, load_config
from pipeline.cpus import set_torch_threads
from pipeline.errors import PipelineError

DEFAULT_CONFIG = "configs/demo.yaml"


def stage_main(name: str, run: Callable[[Config, argparse.Namespace], object],
               add_args: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: list[str] | None = None, torch_threads: bool = True) -> int:
    """Parse the CLI, load the config, run the stage; a PipelineError becomes one line on stderr and exit 1.
    ``torch_threads``: size torch's thread pool first (a stage that may run without torch sizes it itself)."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=f"fashion-distill '{name}' stage")
    parser.add_argument("--config", default=os.environ.get("CONFIG", DEFAULT_CONFIG), help="YAML config file")
    parser.add_argument("--force", action="store_true", help="rerun even if the stage output is up to date")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # launchers
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if torch_threads:
        set_torch_threads()
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg, args)
    except PipelineError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    return 0
