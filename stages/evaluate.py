"""`evaluate`: score any predictions file against the run's ground-truth test split, like a student.

``make evaluate PRED=captions.jsonl [CONFIG=...]`` (``python -m stages.evaluate --pred FILE [--allow-missing]``):
every n-gram metric (pycocoevalcap) and the attribute accuracy, next to the majority-attribute baseline of the
ground-truth training captions. Prints a table and writes ``<FILE stem>.eval.json`` next to the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.rundir import RunDir, atomic_write_json, require_stage
from pipeline.data.formats import load_captions, split_rows
from pipeline.evaluation.attributes import ATTRIBUTES, majority_baseline
from pipeline.evaluation.metrics import METRICS, CaptionScorer
from pipeline.evaluation.predictions import read_predictions
from pipeline.reporting.tables import markdown_table
from pipeline.workflows.students import score_test_split
from stages.cli import stage_main


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, help="predictions file (.jsonl, .json or .csv)")
    parser.add_argument("--allow-missing", action="store_true", help="score the test images that have a prediction")


def run(cfg: Config, args: argparse.Namespace) -> Path:
    rd = RunDir(cfg.run_dir)
    require_stage(rd.data, "prepare")
    data = load_captions(rd.data / "captions")
    test_rows = split_rows(data, "test")
    predictions = read_predictions(args.pred, test_rows, allow_missing=args.allow_missing)
    references = {r["image_id"]: r["caption"] for r in test_rows if r["image_id"] in predictions}
    with CaptionScorer() as scorer:
        scores = score_test_split(scorer, references, predictions)
    majority = majority_baseline([r["caption"] for r in split_rows(data, "train")], references)
    result = {"predictions": str(args.pred), "run_dir": str(rd.root), "test_images": len(test_rows),
              "scored_images": len(predictions), **scores, "majority_attributes": majority}
    out = Path(args.pred).with_name(Path(args.pred).stem + ".eval.json")
    atomic_write_json(out, result)
    rows = [[m, scores["test"][m], None] for m in METRICS]
    rows += [["attributes (macro)", scores["attributes"]["macro"], majority["macro"]]]
    rows += [[f"  {label}", scores["attributes"]["per_attribute"][a], majority["per_attribute"][a]]
             for a, label in ATTRIBUTES.items()]
    print(f"{args.pred}: {len(predictions)} of {len(test_rows)} test images\n")
    print(markdown_table(["metric", "predictions", "majority baseline"], rows))
    print(f"written: {out}")
    return out


if __name__ == "__main__":
    sys.exit(stage_main("evaluate", run, add_args))
