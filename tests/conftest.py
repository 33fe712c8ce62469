"""Shared fixtures: tiny DeepFashion-lite datasets and configs built in temp folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import TEACHER_TRAIN, write_config  # noqa: E402 (after the environment it reads)


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


@pytest.fixture
def make_config(tmp_path):
    return lambda **sections: write_config(tmp_path, **sections)


@pytest.fixture(scope="session")
def teacher_world(tmp_path_factory):
    """DeepFashion-lite (160 images) and a tiny teacher shared by the teacher/distill tests.

    Returns ``make(name, **sections) -> config path`` for a fresh run directory that already has `prepare` done.
    """
    from argparse import Namespace

    from pipeline.core.config import load_config
    from pipeline.data.formats import load_captions, split_rows
    from pipeline.demo.base_model import ensure_base_model
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
