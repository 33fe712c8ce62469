"""Preflight: what a run needs before it starts, checked in seconds rather than found hours later in a queue.

``make check`` (and ``make submit``, before it submits anything) runs :func:`preflight` over the whole chain; each
stage runs :func:`require_inputs` for its own inputs when it starts (on the node, where the GPUs are). Every problem
is one line naming the config key and the path. The teacher folder is checked generically (any Hugging Face
image-text-to-text checkpoint): ``config.json``, every weight file its index names (or a single weights file), the
tokenizer and processor files. The demo's generated inputs (``data.synthetic``, ``teacher.tiny``,
``students.encoder.stand_in``) are not checked before they exist: their stage builds them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from pipeline.core.archs import ARCHS
from pipeline.core.config import Config
from pipeline.core.errors import PipelineError
from pipeline.data.deepfashion import IMAGE_DIR, SINGLE_FILE, SPLIT_FILES, check_image

SAMPLE = 200  # records of the dataset whose images are opened
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
FEATURE_BYTES = 1_200_000  # per image, every frozen encoder's cached features (estimate: ResNet grid + ViT tokens)


class PreflightError(PipelineError):
    """One or more inputs of the run are missing or unusable; one line each."""


def check_data(cfg: Config, sample: int = SAMPLE) -> list[str]:
    """``data.root``: a known layout, caption files that parse, and a spread sample of records' images readable."""
    root = Path(cfg.data.root)
    if not root.exists():
        return [] if cfg.data.synthetic else [f"data.root: {root} does not exist"]
    if not root.is_dir():
        return [f"data.root: {root} is not a folder"]
    split_files = [root / f for f in SPLIT_FILES.values()]
    use_split = cfg.data.layout == "split" or (cfg.data.layout == "auto" and (
        all(f.is_file() for f in split_files) or not (root / SINGLE_FILE).is_file()))
    files = split_files if use_split else [root / SINGLE_FILE]
    problems = [f"data.root: {f} missing (layout {cfg.data.layout}: images/ + {SINGLE_FILE}, or images/ + "
                f"{' + '.join(SPLIT_FILES.values())})" for f in files if not f.is_file()]
    if not (root / IMAGE_DIR).is_dir():
        problems.append(f"data.root: {root / IMAGE_DIR} is not a folder (the images)")
    if problems:
        return problems
    names: list[str] = []
    for f in files:
        try:
            captions = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            return [f"data.root: {f} is not a JSON object of image file name -> caption ({exc})"]
        if not isinstance(captions, dict) or not captions:
            return [f"data.root: {f} is not a non-empty JSON object of image file name -> caption"]
        names += sorted(captions)
    picked = names[:: max(1, len(names) // sample)][:sample]
    bad = [(name, why) for name in picked if (why := check_image(root / IMAGE_DIR / name, "header"))]
    if bad:
        name, why = bad[0]
        problems.append(f"data.root: {len(bad)} of {len(picked)} sampled images unusable, e.g. "
                        f"{root / IMAGE_DIR / name}: {why}")
    return problems


def _weights(folder: Path) -> list[str]:
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                return [f"teacher.model: {folder / index} is not a weight index with a weight_map ({exc})"]
            return [f"teacher.model: {folder / s} missing (named by {index})" for s in shards
                    if not (folder / s).is_file()]
    if any((folder / f).is_file() for f in SINGLE_WEIGHTS):
        return []
    return [f"teacher.model: no weights in {folder} (none of {', '.join(WEIGHT_INDEXES + SINGLE_WEIGHTS)})"]


def check_teacher(cfg: Config) -> list[str]:
    """``teacher.model``: a complete Hugging Face checkpoint folder (config, weights, tokenizer, processor)."""
    folder = Path(cfg.teacher.model)
    if not folder.exists():
        return [] if cfg.teacher.tiny else [
            f"teacher.model: {folder} does not exist (download it: hf download <repo> --local-dir {folder})"]
    if not folder.is_dir():
        return [f"teacher.model: {folder} is not a folder"]
    problems = [] if (folder / "config.json").is_file() else [f"teacher.model: {folder / 'config.json'} missing"]
    problems += _weights(folder)
    for kind, names in (("tokenizer", TOKENIZER_FILES), ("processor", PROCESSOR_FILES)):
        if not any((folder / n).is_file() for n in names):
            problems.append(f"teacher.model: no {kind} file in {folder} (none of {', '.join(names)})")
    return problems


def check_encoders(cfg: Config) -> list[str]:
    """``students.encoder.pretrained``: each architecture's torchvision weights file where the students look."""
    settings = cfg.students.encoder
    if not settings.pretrained or settings.stand_in is not None:
        return []
    from pipeline.students.encoders import weights_file  # imports torch: only when weights are to be found

    missing = {weights_file(ARCHS[a].encoder, settings) for a in cfg.students.archs}
    return [f"students.encoder.pretrained: {path} missing (torchvision's {path.name}; students.encoder.weights_dir "
            "sets the folder)" for path in sorted(missing) if not path.is_file()]


def check_java() -> list[str]:
    """METEOR (pycocoevalcap) runs a Java jar when students and the report are scored."""
    return [] if shutil.which("java") else [
        "java: not found on PATH; METEOR needs it (Debian: apt-get install default-jre-headless)"]


def disk_estimate(cfg: Config) -> int:
    """Bytes the run will write (an estimate): the teacher's checkpoints and adapter (a tenth of its weights),
    the frozen encoders' feature caches, 1 GB for datasets, predictions and reports."""
    folder, images = Path(cfg.teacher.model), 0
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0
    root = Path(cfg.data.root)
    for f in (root / SINGLE_FILE, *(root / n for n in SPLIT_FILES.values())):
        if f.is_file():
            try:
                images += len(json.loads(f.read_text(encoding="utf-8")))
            except (ValueError, TypeError, UnicodeDecodeError):
                pass
    features = 0 if cfg.students.encoder.finetune else images * FEATURE_BYTES
    return weights // 10 + features + 10**9


def check_disk(cfg: Config) -> list[str]:
    """Free space where ``run_dir`` goes against :func:`disk_estimate`."""
    where = Path(os.path.abspath(cfg.run_dir))
    while not where.exists():
        where = where.parent
    free, need = shutil.disk_usage(where).free, disk_estimate(cfg)
    if free >= need:
        return []
    return [f"run_dir: {free / 1e9:.1f} GB free at {where}, the run needs about {need / 1e9:.1f} GB (estimate)"]


def check_gpus(cfg: Config, stage: str) -> list[str]:
    """On a Slurm node (``SLURM_JOB_ID``): the GPUs this job sees against what the config asks of ``stage``."""
    wanted = cfg.slurm.gpus_per_node if stage == "finetune" else min(cfg.slurm.gpus_per_node, 1)
    if not os.environ.get("SLURM_JOB_ID") or not wanted or stage not in GPU_STAGES:
        return []
    import torch

    seen = torch.cuda.device_count()
    return [] if seen >= wanted else [f"slurm.gpus_per_node: {stage} expects {wanted} GPU(s), this job sees {seen}"]


GPU_STAGES = ("finetune", "distill", "students", "sweep")
STAGE_CHECKS: dict[str, list[Callable[[Config], list[str]]]] = {
    "prepare": [check_data],
    "finetune": [check_teacher],
    "distill": [check_teacher],
    "students": [check_encoders],
    "sweep": [check_teacher, check_encoders],
}


def preflight(cfg: Config) -> list[str]:
    """Every problem of the whole chain's inputs and environment, one line each (empty: ready to run)."""
    problems = check_data(cfg) + check_teacher(cfg) + check_encoders(cfg) + check_java()
    return problems + check_disk(cfg)


def require_inputs(cfg: Config, stage: str) -> None:
    """A stage's own inputs at its start (and its GPUs on a Slurm node); raises with one line per problem."""
    problems = [p for check in STAGE_CHECKS.get(stage, []) for p in check(cfg)] + check_gpus(cfg, stage)
    if problems:
        raise PreflightError("\n".join(problems) if len(problems) == 1 else
                             f"{len(problems)} problems:\n" + "\n".join(problems))
