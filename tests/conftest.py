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


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` where no CUDA device is present (torch is imported only when there are some)."""
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in gpu_tests:
        item.add_marker(skip)


def write_config(tmp_path: Path, **sections) -> Path:
    """A demo-shaped config under ``tmp_path`` with ``sections`` merged in (nested dicts merge). The demo's
    pretraining stand-ins are off (random teacher and encoders) unless ``sections`` turn them on."""
    from pipeline.config import merge_trees

    base = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    base["run_dir"] = str(tmp_path / "run")
    base["data"]["root"] = str(tmp_path / "raw")
    base["data"]["synthetic"] = {"num_images": 60, "image_size": 32, "layout": "single"}
    base["data"]["split"] = {"test": 0.2, "val": 0.1}
    base["data"].pop("pretraining")
    base["teacher"]["model"] = str(tmp_path / "tiny-llava")
    base["teacher"]["tiny"] = {}
    base["teacher"]["lora"]["train_projector"] = True  # a random base: its projector must learn too
    base["students"]["encoder"] = {"pretrained": False, "width": 0.25, "image_size": 96}
    base["students"].update(epochs=6, val_every_epochs=3)  # the tests' tiny data: fewer rounds than the demo's
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(merge_trees(base, sections)))
    return path


@pytest.fixture
def make_config(tmp_path):
    return lambda **sections: write_config(tmp_path, **sections)


def run_stage(module: str, *args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600):
    import subprocess

    return subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


TEACHER_TRAIN = {"epochs": 2, "per_device_batch_size": 8, "eval_steps": 10, "save_steps": 10, "logging_steps": 5,
                 "max_val_samples": 16, "eval_generation_samples": 8}


@pytest.fixture(scope="session")
def teacher_world(tmp_path_factory):
    """DeepFashion-lite (160 images) and a tiny teacher shared by the teacher/distill tests.

    Returns ``make(name, **sections) -> config path`` for a fresh run directory that already has `prepare` done.
    """
    from argparse import Namespace

    from pipeline.config import load_config
    from pipeline.data.formats import load_captions, split_rows
    from pipeline.teacher.base import ensure_base_model
    from stages import prepare

    base = tmp_path_factory.mktemp("teacher_world")

    def make(name: str, **sections) -> Path:
        folder = base / name
        folder.mkdir()
        merged = {"data": {"root": str(base / "raw"), "synthetic": {"num_images": 160, "image_size": 48}},
                  "teacher": {"model": str(base / "tiny-llava"), "train": dict(TEACHER_TRAIN)},
                  "distill": {"max_new_tokens": 40, "batch_size": 8}}
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                for k, v in value.items():
                    if isinstance(v, dict) and isinstance(merged[key].get(k), dict):
                        merged[key][k] = {**merged[key][k], **v}
                    else:
                        merged[key][k] = v
            else:
                merged[key] = value
        path = write_config(folder, **merged)
        prepare.run(load_config(path), Namespace(force=False))
        return path

    cfg = load_config(make("_base"))
    data = load_captions(cfg.run_dir / "data" / "captions")
    ensure_base_model(cfg, [r["caption"] for r in split_rows(data, "train")])
    return make
