"""Shared test helpers: configs in temp folders, stage runs as a user types them, small students and images.

Fixtures stay in ``conftest.py``; tests import these names from here (never from ``conftest`` or another test).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from pipeline.core.archs import ARCHS as ARCH_TABLE
from pipeline.core.config import EncoderSettings, StudentsConfig, merge_trees
from pipeline.students.checkpoint import describe_student, save_student
from pipeline.students.decoders import build_decoder
from pipeline.students.encoders import build_encoder
from pipeline.students.features import decoder_input
from pipeline.students.vocab import Vocabulary

ROOT = PROJECT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, **sections) -> Path:
    """A demo-shaped config under ``tmp_path`` with ``sections`` merged in (nested dicts merge). The demo's
    pretraining stand-ins are off (random teacher and encoders) unless ``sections`` turn them on."""
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
    base["students"].pop("sources")  # gt and every distilled dataset
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(merge_trees(base, sections)))
    return path


def run_stage(module: str, *args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600):
    return subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


TEACHER_TRAIN = {"epochs": 2, "per_device_batch_size": 8, "eval_steps": 10, "save_steps": 10, "logging_steps": 5,
                 "max_val_samples": 16, "eval_generation_samples": 8}



# the demo-shaped chain at its smallest (`stages.demo`, `make submit` dry runs)
TINY = {
    "data": {"synthetic": {"num_images": 120, "image_size": 48}},
    "teacher": {"train": {"epochs": 2, "per_device_batch_size": 8, "eval_steps": 10, "save_steps": 10,
                          "max_val_samples": 8, "eval_generation_samples": 4}},
    "distill": {"max_new_tokens": 160, "batch_size": 16},
    "students": {"archs": ["vgg19_gru", "vit_transformer"], "epochs": 2, "batch_size": 16, "beam_size": 2,
                 "encoder": {"pretrained": False, "width": 0.125, "image_size": 48}},
    "report": {"gallery_size": 4},
}


ARCHS = tuple(ARCH_TABLE)  # every student architecture
WORDS = ["the", "lady", "gentleman", "wears", "a", "short-sleeve", "long-sleeve", "shirt", "sweater", "with",
         "cotton", "denim", "fabric", "pants", "shorts", "skirt", "hat", "stripe", "pure", "color", "pattern", "."]
# added to the <end> logit of a random decoder so that its captions have different lengths
END_BIAS = {"vgg19_gru": 0.1, "resnet101_gru": 0.3, "resnet101_attn_gru": 1.0, "vit_transformer": 0.6}
SMALL = StudentsConfig(embed_dim=16, hidden_dim=32, transformer_heads=4, transformer_layers=2, max_length=12,
                       dropout=0.0, beam_size=3, encoder=EncoderSettings(width=0.125, image_size=32))


def vllm_engine_missing() -> str | None:
    """Why the vLLM engine's environment cannot be used here (one line), or None when it can."""
    from pipeline.teacher.vllm_engine import EngineError, worker_python

    try:
        worker_python()
    except EngineError as exc:
        return str(exc)
    return None


def kill_stage_when(args: list[str], ready: Callable[[], bool], timeout: float = 300) -> None:
    """Run ``python -m <args>`` in its own session and SIGKILL the whole group (the stage and any worker it started)
    as soon as ``ready()`` holds (or after ``timeout`` seconds)."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def make_student(folder: Path, arch: str, cfg: StudentsConfig = SMALL, seed: int = 0) -> Path:
    """A random-weight student saved as the students stage saves one."""
    torch.manual_seed(seed)
    vocab = Vocabulary(WORDS)
    encoder = build_encoder(ARCH_TABLE[arch].encoder, cfg.encoder, seed).eval()
    size = cfg.encoder.image_size
    with torch.no_grad():
        feat_dim = decoder_input(arch, encoder(torch.zeros(1, 3, size, size))).shape[-1]
        decoder = build_decoder(arch, feat_dim, len(vocab), cfg)
        decoder.out.bias[vocab.end_id] += END_BIAS[arch]
    meta = describe_student(arch, cfg, feat_dim=feat_dim, vocab_size=len(vocab), seed=seed, encoder_finetuned=False)
    save_student(folder, decoder, vocab, meta, encoder)
    return folder


def varied_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Small RGB images of different sizes, colours and shapes."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        h, w = rng.integers(24, 64, 2)
        pixels = np.full((h, w, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        pixels[y: y + h // 2, x: x + w // 2] = rng.integers(0, 256, 3)
        noise = rng.integers(-20, 20, (h, w, 3))
        images.append(Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)))
    return images


# the chain `make submit` plans for slurm_config: job -> the jobs it waits for (afterok)
CHAIN = {"prepare": [], "finetune": ["prepare"], "reset-precise": ["finetune"], "distill-precise": ["reset-precise"],
         "merge-precise": ["distill-precise"], "reset-creative": ["finetune"], "distill-creative": ["reset-creative"],
         "merge-creative": ["distill-creative"], "features": ["prepare"], "students-gt": ["prepare", "features"],
         "students-precise": ["prepare", "features", "merge-precise"],
         "students-creative": ["prepare", "features", "merge-creative"],
         "speed": ["finetune", "students-gt", "students-precise", "students-creative", "merge-precise",
                   "merge-creative"],
         "report": ["students-gt", "students-precise", "students-creative", "merge-precise", "merge-creative",
                    "speed"]}


def slurm_config(tmp_path, **extra):
    """The e2e test's tiny demo, smaller still: the chain's point here is the scheduling, not the numbers."""
    sections = {**TINY, "slurm": {"gpus_per_node": 0, "cpus_per_task": 1, "distill_shards": 2,
                                  "setup": [f"source {ROOT / '.venv' / 'bin' / 'activate'}"]}}
    sections["data"] = {"synthetic": {"num_images": 80, "image_size": 48}}
    sections["teacher"] = {"train": {**TINY["teacher"]["train"], "epochs": 1, "eval_generation_samples": 2}}
    sections["students"] = {**TINY["students"], "archs": ["vgg19_gru"], "epochs": 1}
    for key, value in extra.items():
        sections[key] = {**sections.get(key, {}), **value} if isinstance(value, dict) else value
    return write_config(tmp_path, **sections)
