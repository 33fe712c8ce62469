"""`engine`: print the teacher's generation engine the config selects (``hf`` or ``vllm``).

``python -m stages.engine --config <yaml> [key=value ...]``. The Makefile asks it before a target that may generate
with the teacher, and makes the vLLM engine's environment (``make vllm-env``) when the answer is ``vllm``.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.core.config import Config
from stages.cli import stage_main


def run(cfg: Config, args: argparse.Namespace) -> str:
    print(cfg.distill.engine)
    return cfg.distill.engine


if __name__ == "__main__":
    sys.exit(stage_main("engine", run, torch_threads=False))
