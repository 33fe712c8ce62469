"""`sweep`: at which teacher temperature (and with how many captions per image, and with unlabelled images or not)
should a student be distilled? ``make sweep [ARGS="sweep.temperatures=[0,0.5,1] sweep.student=vgg19_gru"]``.

Per point: the teacher distils ``<run_dir>/distill/sweep-t<T>/`` (the distill stage's function: per-image seeds,
batching, resume), ``sweep.student`` trains on it (``<run_dir>/students/<arch>__sweep-t<T>/``, the students' function),
scored on the ground-truth test split and, for the choice of temperature, on the ground-truth validation split.
Output in ``<run_dir>/sweep/``: ``points/<point>.json``, ``points.json``, ``sweep.csv``, ``best.json`` (the
temperature chosen on validation, test scores beside), ``sweep.png`` and ``manifest.json`` (last). ``--point`` runs
one point (``gt``, ``t<T>``, ``k<k>`` or ``unlabeled``: what `make submit`'s sweep arrays run). The work is
:mod:`pipeline.workflows.sweep`.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.core.config import Config
from pipeline.core.errors import PipelineError
from pipeline.workflows.sweep import run_point, run_sweep
from stages.cli import stage_main, waits


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--point", default=None, help="run only this point: gt, t<T> (e.g. t0.5), k<k> or "
                        "unlabeled (the last two at the best temperature, once the others are measured)")
    parser.add_argument("--only", choices=("distill", "train"), default=None,
                        help="with --point: only distil its dataset, or only train and measure its student")


def run(cfg: Config, args: argparse.Namespace) -> object:
    if args.point is not None:
        return run_point(cfg, args.point, only=args.only, force=args.force, wait=waits(args))
    if args.only:
        raise PipelineError("--only needs --point")
    return run_sweep(cfg, force=args.force, wait=waits(args))


if __name__ == "__main__":
    sys.exit(stage_main("sweep", run, add_args))
