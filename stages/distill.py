"""`distill`: the fine-tuned teacher captions every train and val image at one temperature.

``make distill TEMP=0.2 [NAME=precise]``. Output in ``<run_dir>/distill/<name>/``: ``generations[.shard-i-of-n]
.jsonl`` (resumable), ``captions/`` (same schema as `prepare`'s; train/val from the teacher with
``source=<name>``, test copied unchanged from the ground truth), ``meta.json``, ``diagnostics.json``,
``rejected.json`` (empty / truncated generations), ``test_generations.json`` (the teacher's captions of the test
images, for its own test score and the report's gallery; never trained on), ``README.md`` (dataset card) and
``manifest.json`` (last).
``distill.samples_per_image`` k: k captions per train/val image (column ``sample``); ``distill.unlabeled``: a folder
of uncaptioned images captioned into the train split (column ``origin``; test images refused, bad files skipped).
Sharding: ``--shard i/n`` (or a Slurm array) generates a disjoint slice; ``--merge`` joins finished shards.
The work is :func:`pipeline.workflows.distill.distill_dataset`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.config import Config
from pipeline.teacher.distill import parse_shard
from pipeline.workflows.distill import distill_dataset
from pipeline.workflows.preflight import require_inputs
from stages.cli import stage_main, waits


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard", default=None, help="i/n: generate only slice i of n (default: Slurm array or 0/1)")
    parser.add_argument("--merge", action="store_true", help="only join the finished shards into the dataset")
    parser.add_argument("--reset", action="store_true", help="only make the work folder ready for these settings "
                        "(wiped with --force or when made with others), once before parallel shards start")


def run(cfg: Config, args: argparse.Namespace) -> Path:
    if not (args.merge or args.reset):  # the reset and merge jobs read no teacher (and have no GPU)
        require_inputs(cfg, "distill")
    return distill_dataset(cfg, shard=parse_shard(args.shard), merge=args.merge, reset=args.reset, force=args.force,
                           wait=waits(args))


if __name__ == "__main__":
    sys.exit(stage_main("distill", run, add_args))
