"""Shared command line of every stage: ``python -m stages.<stage> --config <yaml> [--force] [--wait] [key=value]``."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.config import Config, load_config
from pipeline.core.cpus import set_torch_threads
from pipeline.core.errors import PipelineError
from pipeline.core.rundir import claim_output

DEFAULT_CONFIG = "configs/demo.yaml"
log = logging.getLogger("cli")
StageRun = Callable[[Config, argparse.Namespace], Any]


def waits(args: argparse.Namespace) -> bool:
    """Whether the stage waits for an output another process holds (``--wait``) instead of failing."""
    return getattr(args, "wait", False)


def claims(output: Callable[[Config, argparse.Namespace], Path | None],
           part: Callable[[Config, argparse.Namespace], str] | None = None
           ) -> Callable[[StageRun], StageRun]:
    """Decorate a stage's ``run(cfg, args)``: it runs holding :func:`pipeline.core.rundir.claim_output` on the folder
    ``output(cfg, args)`` names (no claim when that is None), or on its ``part(cfg, args)`` such as a shard."""
    def decorate(run: StageRun) -> StageRun:
        @functools.wraps(run)
        def claimed(cfg: Config, args: argparse.Namespace) -> Any:
            folder = output(cfg, args)
            if folder is None:
                return run(cfg, args)
            with claim_output(folder, part=part(cfg, args) if part else "", wait=waits(args)):
                return run(cfg, args)
        return claimed
    return decorate


def os_error_line(exc: OSError) -> str:
    """``file: reason`` for a failed file operation (disk full, read-only or missing folder, permissions)."""
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


def stage_main(name: str, run: StageRun, add_args: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: list[str] | None = None, torch_threads: bool = True) -> int:
    """Parse the CLI, load the config, run the stage; a PipelineError or a failed file operation becomes one line on
    stderr and exit 1 (the traceback is logged at DEBUG level). ``torch_threads``: size torch's thread pool first (a
    stage that may run without torch sizes it itself)."""
    doc = (sys.modules[run.__module__].__doc__ or f"fashion-distill '{name}' stage").strip()
    parser = argparse.ArgumentParser(prog=f"fashion-distill {name}", description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.environ.get("CONFIG", DEFAULT_CONFIG), help="YAML config file")
    parser.add_argument("--force", action="store_true", help="rerun even if the stage output is up to date")
    parser.add_argument("--wait", action="store_true",
                        help="when another process is writing the same output, wait for it instead of failing")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective config (file + base + overrides) as YAML and exit")
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
        if args.print_config:
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
            return 0
        run(cfg, args)
    except (PipelineError, OSError) as exc:
        log.debug("%s failed", name, exc_info=True)
        line = os_error_line(exc) if isinstance(exc, OSError) else str(exc)
        print(f"{name}: error: {line}", file=sys.stderr)
        return 1
    return 0
