"""`speed`: the teacher and the best student of each caption source captioning the same test images on the CPU,
quickly, for the report's answer.

Writes ``<run_dir>/speed/speed.json`` and ``manifest.json`` (:mod:`pipeline.inference.speed`): images/s per model,
runtime and batch size, parameters and size on disk. The chain runs it before `report` with quick settings (a few
test images at batch 1 and one larger batch, one timed pass, PyTorch; onnxruntime for students already exported),
so the report always has its speed answer and ``speed_quality.png``. It is skipped while the timings cover the
current teacher and best students, whoever measured them: ``make bench BENCH_ARGS="--only speed"`` measures every
student thoroughly.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.cpus import cpu_share
from pipeline.core.errors import PipelineError
from pipeline.core.rundir import RunDir, is_up_to_date
from pipeline.inference.speed import QUICK, measure_run, write_speed
from pipeline.workflows import depends
from stages.cli import claims, stage_main

log = logging.getLogger("speed")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=QUICK.images, help="test images each model captions")
    parser.add_argument("--batch-sizes", default=",".join(map(str, QUICK.batch_sizes)),
                        help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=QUICK.repeats, help="timed passes (the median is kept)")


@claims(lambda cfg, args: RunDir(cfg.run_dir).speed)
def run(cfg: Config, args: argparse.Namespace) -> Path:
    started = time.time()
    rd = RunDir(cfg.run_dir)
    try:
        sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise PipelineError(f"--batch-sizes {args.batch_sizes!r}: expected comma-separated integers") from None
    if args.images < 1 or args.repeats < 1 or min(sizes) < 1:
        raise PipelineError("--images, --repeats and --batch-sizes must be at least 1")
    config, inputs = depends.speed(cfg, rd)
    if not args.force and is_up_to_date(rd.speed, config, inputs):
        log.info("%s is up to date (use --force to rerun)", rd.speed)
        return rd.speed
    for name in ("onnxscript", "onnx_ir"):  # the ONNX exporter's pass-by-pass INFO lines
        logging.getLogger(name).setLevel(logging.WARNING)
    settings = dataclasses.replace(QUICK, images=args.images, batch_sizes=sizes, repeats=args.repeats,
                                   threads=cpu_share())
    speed = measure_run(rd, settings, cfg, students=[rd.students / name for name in inputs if name != "teacher"])
    path = write_speed(rd, {**speed, "measured_by": "the chain's quick speed step"}, started)
    log.info("%d models timed in %.1f s -> %s", len(speed["models"]), time.time() - started, path)
    return path


if __name__ == "__main__":
    sys.exit(stage_main("speed", run, add_args))
