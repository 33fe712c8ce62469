"""Shared fixtures: tiny DeepFashion-lite datasets and configs built in temp folders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_config(tmp_path: Path, **sections) -> Path:
    """A demo-shaped config under ``tmp_path`` with ``sections`` merged in (nested dicts merge)."""
    base = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    base["run_dir"] = str(tmp_path / "run")
    base["data"]["root"] = str(tmp_path / "raw")
    base["data"]["synthetic"] = {"num_images": 60, "image_size": 32, "layout": "single"}
    base["teacher"]["model"] = str(tmp_path / "tiny-llava")

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    merge(base, sections)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.fixture
def make_config(tmp_path):
    return lambda **sections: write_config(tmp_path, **sections)


def run_stage(module: str, *args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600):
    import subprocess

    return subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
