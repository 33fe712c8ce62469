"""``fashion-distill <stage> [--config <yaml>] [key=value ...]`` (and ``python -m stages``): one command for every
stage. The stage list and its help are plain text here, so ``--help`` answers without importing torch."""

from __future__ import annotations

import runpy
import sys

STAGES = {
    "demo": "every stage of the chain, locally (CPU, minutes with configs/demo.yaml)",
    "prepare": "read and check the raw dataset, split it into <run_dir>/data",
    "finetune": "LoRA fine-tune the teacher on the training captions",
    "distill": "caption the training images with the teacher at distill.temperature",
    "students": "train the small captioners on each caption source",
    "report": "tables, plots and the answer: results.md in <run_dir>/report",
    "sweep": "distil at several temperatures, pick one on validation",
    "check": "preflight: dataset, teacher checkpoint, encoder weights, Java, disk",
    "submit": "the chain as Slurm jobs (--dry-run: write and print the scripts only)",
    "status": "the state of each job: Slurm's, or from the run folder on a local run",
    "evaluate": "score a predictions file against the test split",
    "caption": "caption your own images with a student or the teacher",
    "export": "ONNX graphs of a student for onnxruntime",
}
USAGE = "usage: fashion-distill <stage> [--config <yaml>] [--force] [--wait] [--print-config] [key=value ...]"


def usage() -> str:
    rows = "\n".join(f"  {name:9s} {text}" for name, text in STAGES.items())
    return (f"{USAGE}\n\nstages (in chain order, then the cluster and the tools):\n{rows}\n\n"
            "`fashion-distill <stage> --help` shows a stage's own options; --config defaults to configs/demo.yaml.")


def main(argv: list[str] | None = None) -> int:
    """Run ``stages.<stage>`` as ``python -m stages.<stage>`` would, with the remaining arguments."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    stage, *rest = argv
    if stage not in STAGES:
        print(f"fashion-distill: unknown stage {stage!r}\n{usage()}", file=sys.stderr)
        return 2
    sys.argv = [f"fashion-distill {stage}", *rest]
    try:
        runpy.run_module(f"stages.{stage}", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
