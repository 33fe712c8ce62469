"""`students`: train every (architecture x caption source) and score it on the ground-truth test split.

Sources are ``gt`` plus every finished distilled dataset of the run (or ``students.sources``, which may also name
``gt+<dataset>``: the ground truth plus the dataset's captions of its unlabelled images). Every source trains on its
own train rows and is validated and tested on the ground truth. Output per model in
``<run_dir>/students/<arch>__<source>/`` (``__s<seed>`` appended for each seed of ``students.seeds`` but the first):
``best/`` (self-describing: decoder and encoder safetensors, student.json, vocab.json, README.md model card; what
``make caption`` and ``make export`` take), ``last/`` (resume), ``metrics.json`` (n-gram metrics, attribute
accuracy, image reliance), ``predictions.jsonl``, ``per_image.json``, ``curves.json``, ``tensorboard/``,
``manifest.json`` (last); with ``students.scst``, also ``cross_entropy/``, ``scst/`` and ``scst_last/``. Also
``baseline__<source>/metrics.json`` (constant caption and majority attributes), ``features/`` (the frozen encoders'
feature cache) and ``summary.md`` / ``summary.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.errors import PipelineError
from pipeline.core.rundir import RunDir, claim_output, require_stage
from pipeline.data.formats import SPLITS, load_splits
from pipeline.demo.standins import stand_in_weights
from pipeline.evaluation.metrics import CaptionScorer
from pipeline.evaluation.results import write_source_baselines
from pipeline.workflows import depends
from pipeline.workflows.preflight import require_inputs
from pipeline.workflows.students import run_experiment, source_rows, write_summary
from stages.cli import stage_main, waits


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features-only", action="store_true", help="only build the frozen encoders' feature "
                        "caches (the Slurm job before the students array)")


def run(cfg: Config, args: argparse.Namespace) -> Path:
    from pipeline.students.features import DecoderInputs

    rd = RunDir(cfg.run_dir)
    require_stage(rd.data, "prepare")
    require_inputs(cfg, "students")
    gt = load_splits(rd.data / "captions")
    if not gt["test"]:
        raise PipelineError(f"{rd.data}: the ground-truth test split is empty")
    decoder_inputs = DecoderInputs(rd.students / "features", cfg.students, cfg.seed,
                                   sorted({r["image_path"] for s in SPLITS for r in gt[s]}),
                                   stand_in_weights(cfg))
    if getattr(args, "features_only", False):
        decoder_inputs.build_caches(cfg.students.archs)
        return rd.students / "features"
    sources = cfg.students.sources or ["gt", *rd.distilled_sources()]
    for s in sources:
        depends.require_source(rd, s)
    with CaptionScorer(meteor=True) as scorer:
        for source in sources:
            rows = source_rows(rd, source, gt)
            write_source_baselines(rd.students / f"baseline__{source}", depends.source_baselines(rd, source), scorer,
                                   [r["caption"] for r in rows["train"]], gt["test"])
            for arch in cfg.students.archs:  # one lock per model: array tasks train different ones in parallel
                for seed in depends.model_seeds(cfg):
                    with claim_output(depends.student_folder(cfg, rd, arch, source, seed), wait=waits(args)):
                        run_experiment(cfg, rd, arch=arch, source=source, rows=rows, test_rows=gt["test"],
                                       scorer=scorer, decoder_inputs=decoder_inputs, force=args.force, seed=seed)
    print(write_summary(rd))
    return rd.students


if __name__ == "__main__":
    sys.exit(stage_main("students", run, add_args))
