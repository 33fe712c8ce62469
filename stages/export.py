"""`export`: a trained student as ONNX graphs runnable with onnxruntime alone.

``make export STUDENT=<best/ folder>`` (``python -m stages.export --student DIR``) writes ``DIR/onnx/``: the encoder
(pixels -> decoder input features), the decoder's ``init_state`` and one decoder ``step`` (see
:mod:`pipeline.students.export`), checked against PyTorch before they are published. An export already made from
the weights ``DIR`` holds is kept (``--force`` exports again). Then ``make caption STUDENT=DIR IMAGES=...
RUNTIME=onnx``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.errors import PipelineError
from stages.cli import stage_main


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", required=True, help="a student's best/ folder")


def run(cfg: Config, args: argparse.Namespace) -> Path:
    from pipeline.students.export import export_onnx
    from pipeline.students.onnx_runtime import read_onnx_json

    best = Path(args.student)
    if not args.force:
        try:
            read_onnx_json(best, best / "onnx")  # complete and made from the weights best/ holds now
        except PipelineError:
            pass
        else:
            print(f"up to date: {best / 'onnx'} (--force exports again)")
            return best / "onnx"
    for name in ("onnxscript", "onnx_ir"):  # the exporter's pass-by-pass INFO lines
        logging.getLogger(name).setLevel(logging.WARNING)
    out = export_onnx(best)
    print(f"exported -> {out}")
    return out


if __name__ == "__main__":
    sys.exit(stage_main("export", run, add_args))
