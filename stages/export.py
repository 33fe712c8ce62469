"""`export`: a trained student as ONNX graphs runnable with onnxruntime alone.

``make export STUDENT=<best/ folder>`` (``python -m stages.export --student DIR``) writes ``DIR/onnx/``: the encoder
(pixels -> decoder input features), the decoder's ``init_state`` and one decoder ``step`` (see
:mod:`pipeline.students.export`), checked against PyTorch before they are published. Then ``make caption
STUDENT=DIR IMAGES=... RUNTIME=onnx``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.core.config import Config
from stages.cli import stage_main


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", required=True, help="a student's best/ folder")


def run(cfg: Config, args: argparse.Namespace) -> Path:
    from pipeline.students.export import export_onnx

    for name in ("onnxscript", "onnx_ir"):  # the exporter's pass-by-pass INFO lines
        logging.getLogger(name).setLevel(logging.WARNING)
    out = export_onnx(Path(args.student))
    print(f"exported -> {out}")
    return out


if __name__ == "__main__":
    sys.exit(stage_main("export", run, add_args))
