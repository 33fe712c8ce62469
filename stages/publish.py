"""`publish`: a caption dataset of the run as a folder that can be pushed to the Hugging Face Hub as it is.

``make publish DATASET=<data or distill/<name>> OUT=<folder>`` (``python -m stages.publish --dataset ... --out
...``): Parquet shards under ``OUT/data/`` with the Hub's split names (train, validation, test), every image
embedded as a ``datasets.Image``, and the dataset card ``OUT/README.md`` (licence, ``configs``). The run's own
folders are not changed. Then: ``huggingface-cli upload <you>/<name> OUT --repo-type dataset``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.rundir import RunDir, claim_output
from pipeline.workflows.publish import publish_dataset
from stages.cli import stage_main, waits


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="data (the prepared dataset) or distill/<name>")
    parser.add_argument("--out", required=True, help="the folder to write (replaced only if fashion-distill wrote it)")


def run(cfg: Config, args: argparse.Namespace) -> Path:
    out = Path(args.out)
    with claim_output(out, wait=waits(args)):
        counts = publish_dataset(RunDir(cfg.run_dir), args.dataset, out, cfg.data.root)
    print(f"published {args.dataset} -> {out} ({', '.join(f'{k} {v}' for k, v in counts.items())}); upload: "
          f"huggingface-cli upload <you>/<name> {out} --repo-type dataset")
    return out


if __name__ == "__main__":
    sys.exit(stage_main("publish", run, add_args, torch_threads=False))
