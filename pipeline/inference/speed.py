"""What distillation buys, in speed: the run's fine-tuned teacher and each of its students timed side by side on the
CPU, written to ``<run_dir>/speed/speed.json`` for the report: quickly by the chain's `speed` step (:data:`QUICK`:
the teacher and the best student of each caption source on a few images, PyTorch, onnxruntime only for students
already exported) or thoroughly by ``make bench BENCH_ARGS="--only speed"`` (every student). Either is up to date
while it times the current teacher and best students (``manifest.json``: their fingerprints), so the chain keeps a
bench measurement.

Every model captions the same fixed list of test images through its captioner (the ``caption`` method `make caption`
calls): the teacher greedily in PyTorch, each student with its own beam size (the one its test metrics were scored
with) in PyTorch and in onnxruntime, exported first when it has no current export. The images are decoded once
beforehand, so the time is the captioner's own: preprocessing, encoder and decoding. Per runtime and batch size: one
untimed warm-up batch, then the median of a few timed passes over all images. Both runtimes get the same number of
CPU threads.

``speed.json``: ``images``, ``repeats``, ``batch_sizes``, ``threads``, ``measured_at`` and ``models``, one entry per
model: ``name`` ("teacher" or the student's folder name ``<arch>__<source>``), ``arch`` and ``source`` (students),
``fingerprint`` (its stage manifest's: a model retrained since is not reported with these figures), ``parameters``,
``disk_bytes`` (its PyTorch weights), ``onnx_bytes`` (students), ``beam_size`` and ``images_per_s``
(runtime -> batch size -> images/s; batch sizes as strings, JSON's keys).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.core.config import Config
from pipeline.core.errors import PipelineError
from pipeline.core.rundir import (
    RunDir,
    atomic_write_json,
    is_sweep_source,
    publish_dir,
    read_manifest,
    require_stage,
    write_manifest,
)
from pipeline.students.runtime import Captioner

log = logging.getLogger(__name__)
SPEED_FILE = "speed.json"
RUNTIMES = ("torch", "onnx")


@dataclass(frozen=True)
class SpeedSettings:
    """How the models are timed: ``images`` test images, ``repeats`` timed passes per runtime and batch size,
    ``threads`` CPU threads for every runtime; ``export``: export a student that has no current ONNX export (else
    onnxruntime times only the students already exported)."""

    images: int = 64
    repeats: int = 3
    batch_sizes: tuple[int, ...] = (1, 32)
    threads: int = 1
    export: bool = True


QUICK = SpeedSettings(images=4, repeats=1, batch_sizes=(1, 4), export=False)  # the chain's `speed` step


def images_per_second(captioner: Captioner, images: Sequence[Image.Image], *, batch_size: int, beam_size: int,
                      repeats: int) -> float:
    """Images/s of ``captioner`` over ``images``, ``batch_size`` at a time: one untimed warm-up batch, then the
    median of ``repeats`` timed passes."""
    captioner.caption(images[:batch_size], beam_size)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            captioner.caption(images[i: i + batch_size], beam_size)
        seconds.append(time.perf_counter() - start)
    return len(images) / statistics.median(seconds)


def timing_images(rd: RunDir, count: int) -> list[Image.Image]:
    """The first ``count`` images of the run's test split, as RGB; the split repeated when it has fewer."""
    from pipeline.data.formats import load_captions, split_rows
    from pipeline.data.images import load_rgb

    rows = split_rows(load_captions(rd.data / "captions"), "test")
    if not rows:
        raise PipelineError(f"{rd.data / 'captions'}: the test split is empty; nothing to time")
    decoded = [load_rgb(r["image_path"]) for r in rows[:count]]
    return [decoded[i % len(decoded)] for i in range(count)]


def file_bytes(paths: Iterable[Path]) -> int:
    """Total size of the files ``paths`` names."""
    return sum(Path(p).stat().st_size for p in paths)


def finished_students(rd: RunDir) -> list[Path]:
    """The run's finished student folders (``<arch>__<source>``; baselines and the temperature sweep's students,
    which the report does not compare, excluded), sorted."""
    return sorted(f for f in rd.students.glob("*__*") if not f.name.startswith("baseline__")
                  and not is_sweep_source(f.name.split("__", 1)[1]) and read_manifest(f) is not None)


def timed_models(rd: RunDir) -> dict[str, str]:
    """The models a current ``speed.json`` must time: the teacher and the best student of each caption source (the
    report's answer: :func:`pipeline.evaluation.results.best_per_source`), name (``teacher``, ``<arch>__<source>``)
    -> its stage output's fingerprint; fails naming the stage when the teacher is not fine-tuned."""
    from pipeline.evaluation.results import best_per_source, finished_results

    teacher = require_stage(rd.teacher, "finetune")["fingerprint"]
    best = best_per_source(finished_results(rd)[0])
    return {"teacher": teacher, **{r["folder"].name: read_manifest(r["folder"])["fingerprint"] for r in best}}


def require_run(rd: RunDir) -> None:
    """Fail, naming what to run, unless the run has a fine-tuned teacher and at least one finished student."""
    require_stage(rd.teacher, "finetune")
    if not finished_students(rd):
        raise PipelineError(f"{rd.students}: no finished students to time; run the 'students' stage first")


def _rates(captioner: Captioner, images: Sequence[Image.Image], beam_size: int,
           settings: SpeedSettings) -> dict[str, float]:
    return {str(b): round(images_per_second(captioner, images, batch_size=b, beam_size=beam_size,
                                            repeats=settings.repeats), 3) for b in settings.batch_sizes}


def measure_teacher(rd: RunDir, images: Sequence[Image.Image], settings: SpeedSettings, cfg: Config) -> dict:
    """The run's fine-tuned teacher on the CPU on ``distill.engine`` (HF: adapter merged in memory; vLLM: the
    merged checkpoint it serves)."""
    from pipeline.inference.caption import teacher_captioner
    from pipeline.teacher.loading import finetuned_teacher

    captioner = teacher_captioner(cfg, teacher_dir=rd.teacher, cpu=True, threads=settings.threads)
    engine = captioner.engine
    model_dir, adapter = finetuned_teacher(cfg.teacher.model, rd.teacher)
    weights = [*model_dir.glob("*.safetensors"), *(adapter.glob("*.safetensors") if adapter else [])]
    log.info("timing the teacher (%s, %s %s)", model_dir, engine.name, engine.version)
    try:
        rates = _rates(captioner, images, 1, settings)
    finally:
        engine.close()
    return {"name": "teacher", "fingerprint": require_stage(rd.teacher, "finetune")["fingerprint"],
            "engine": {"name": engine.name, "version": engine.version},
            "parameters": tensor_parameters(model_dir.glob("*.safetensors")),
            "disk_bytes": file_bytes(weights), "beam_size": 1, "images_per_s": {"torch": rates}}


def tensor_parameters(files: Iterable[Path]) -> int:
    """Numbers in the tensors of the safetensors ``files`` (read from their headers)."""
    total = 0
    for path in files:
        with open(path, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def measure_student(folder: Path, images: Sequence[Image.Image], settings: SpeedSettings) -> dict:
    """The student in ``folder`` (``<arch>__<source>``) on the CPU, in PyTorch and in onnxruntime (its ``best/``
    exported first when it has no current export; with ``settings.export`` off, PyTorch only then)."""
    from pipeline.students.checkpoint import load_student
    from pipeline.students.onnx_runtime import OnnxStudent, read_onnx_json

    best = folder / "best"
    exported = True
    try:
        read_onnx_json(best, best / "onnx")
    except PipelineError as exc:
        exported = settings.export
        if exported:
            from pipeline.students.export import export_onnx

            log.info("exporting %s to ONNX first (%s)", folder.name, exc)
            export_onnx(best)
    student = load_student(best, device="cpu")
    beam_size = student.meta["beam_size"]
    log.info("timing %s (beam %d)", folder.name, beam_size)
    arch, source = folder.name.split("__", 1)
    return {"name": folder.name, "arch": arch, "source": source, "fingerprint": read_manifest(folder)["fingerprint"],
            "parameters": sum(p.numel() for m in (student.encoder, student.decoder) for p in m.parameters()),
            "disk_bytes": file_bytes([best / "model.safetensors", best / "encoder.safetensors"]),
            "onnx_bytes": file_bytes((best / "onnx").glob("*.onnx")) if exported else None, "beam_size": beam_size,
            "images_per_s": {"torch": _rates(student, images, beam_size, settings),
                             **({"onnx": _rates(OnnxStudent(best, threads=settings.threads), images, beam_size,
                                                settings)} if exported else {})}}


def measure_run(rd: RunDir, settings: SpeedSettings, cfg: Config, students: Sequence[Path] | None = None) -> dict:
    """Time the teacher (on ``cfg``'s ``distill.engine``; see :func:`measure_teacher`) and the student folders
    ``students`` (default: every finished student of the run) on the same test images; the content of
    ``speed.json``."""
    import torch

    require_run(rd)
    torch.set_num_threads(settings.threads)
    images = timing_images(rd, settings.images)
    models = [measure_teacher(rd, images, settings, cfg)]
    models += [measure_student(folder, images, settings)
               for folder in (finished_students(rd) if students is None else students)]
    return {"images": settings.images, "repeats": settings.repeats, "batch_sizes": list(settings.batch_sizes),
            "threads": settings.threads, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": models}


def write_speed(rd: RunDir, speed: dict, started: float | None = None) -> Path:
    """Publish ``speed`` as ``<run_dir>/speed/speed.json`` with its ``manifest.json``: inputs, the fingerprints of
    the models :func:`timed_models` names that it timed (all of them: current; a model retrained since: stale; more
    models timed, as `make bench` does, change nothing); its path."""
    wanted = timed_models(rd)
    with publish_dir(rd.speed) as tmp:
        atomic_write_json(tmp / SPEED_FILE, speed)
        write_manifest(tmp, stage="speed", config={},
                       inputs={m["name"]: m["fingerprint"] for m in speed["models"] if m["name"] in wanted},
                       started=time.time() if started is None else started,
                       figures={"images": speed["images"], "batch_sizes": speed["batch_sizes"],
                                "threads": speed["threads"]})
    return rd.speed / SPEED_FILE


def read_speed(rd: RunDir) -> dict | None:
    """``speed.json`` with only the models whose stage output is unchanged since they were timed (the others,
    retrained since, are named in ``stale``); None when the run has none."""
    path = rd.speed / SPEED_FILE
    if not path.is_file():
        return None
    speed = json.loads(path.read_text())
    current, stale = [], []
    for model in speed["models"]:
        manifest = read_manifest(rd.teacher if model["name"] == "teacher" else rd.students / model["name"])
        (current if manifest and manifest["fingerprint"] == model["fingerprint"] else stale).append(model)
    if stale:
        log.warning("%s: %s changed since they were timed; rerun make bench BENCH_ARGS=\"--only speed\"", path,
                    ", ".join(m["name"] for m in stale))
    return {**speed, "models": current, "stale": [m["name"] for m in stale]}
