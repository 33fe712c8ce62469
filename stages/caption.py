"""`caption`: caption your own images with a trained student (PyTorch or onnxruntime) or the run's teacher.

``make caption STUDENT=<best/ folder or teacher> IMAGES=<file, folder or glob> [OUT=captions.jsonl] [BEAM=5]
[RUNTIME=torch|onnx]`` (``python -m stages.caption --student DIR --images PATH...``). Writes OUT (one JSON line per
image: ``path``, ``caption``, ``attributes`` the caption states) and ``<OUT stem>.skipped.jsonl`` (files that could
not be captioned, with the reason). A student needs no config; ``teacher`` is the config's run's fine-tuned teacher
(greedy, on ``distill.engine``: ``ARGS=distill.engine=vllm`` serves it with vLLM). ``caption.batch_size`` and
``caption.max_pixels`` (larger images are skipped) come from the config. Exit status 0 when at least one image was
captioned. ``RUNTIME=onnx`` (after ``make export``) never imports torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.cpus import set_torch_threads
from pipeline.core.errors import PipelineError
from pipeline.core.rundir import RunDir
from pipeline.inference.caption import caption_files, find_images, student_captioner, teacher_captioner
from stages.cli import stage_main


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", required=True, help="a student's best/ folder, or 'teacher'")
    parser.add_argument("--images", required=True, nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--out", default="captions.jsonl", help="output JSON lines file")
    parser.add_argument("--beam", type=int, default=None, help="beam size (default: the student's own; 1 = greedy)")
    parser.add_argument("--runtime", choices=("torch", "onnx"), default="torch")


def run(cfg: Config, args: argparse.Namespace) -> Path:
    if args.beam is not None and args.beam < 1:
        raise PipelineError(f"--beam {args.beam}: must be at least 1")
    if args.student == "teacher" and args.runtime != "torch":
        raise PipelineError("--runtime onnx: the teacher runs in PyTorch only")
    paths = find_images(args.images)
    if args.runtime == "torch":  # onnxruntime sizes its own thread pool
        set_torch_threads()
    if args.student == "teacher":
        captioner = teacher_captioner(cfg, teacher_dir=RunDir(cfg.run_dir).teacher)
        beam = 1
    else:
        captioner, beam = student_captioner(Path(args.student), runtime=args.runtime)
    try:
        result = caption_files(captioner, paths, out=Path(args.out), beam_size=args.beam or beam,
                               batch_size=cfg.caption.batch_size, max_pixels=cfg.caption.max_pixels)
    finally:
        if args.student == "teacher":
            captioner.engine.close()
    skipped = f", {len(result.skipped)} skipped (see {result.skipped_file})" if result.skipped else ""
    print(f"captioned {result.captioned} of {len(paths)} images -> {result.out}{skipped}")
    return result.out


if __name__ == "__main__":
    sys.exit(stage_main("caption", run, add_args, torch_threads=False))
