"""What each stage's output depends on: its config slice and its inputs' fingerprints.

One function per stage, called by the stage itself (it skips its work when its manifest matches, see
:func:`pipeline.core.rundir.is_up_to_date`) and by :func:`pipeline.orchestration.plan.plan_chain` (it leaves a job
out for the same reason), so the two never disagree. Each returns ``(config slice, input fingerprints)``; a missing
earlier output raises :class:`~pipeline.core.rundir.StageInputError` naming it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from pipeline.core.archs import ARCHS
from pipeline.core.config import Config, config_slice
from pipeline.core.rundir import (
    RunDir,
    StageInputError,
    fingerprint_tree,
    is_sweep_source,
    read_manifest,
    require_stage,
    sha256_file,
    stage_fingerprint,
)
from pipeline.data.deepfashion import IMAGE_DIR, detect_layout
from pipeline.data.formats import INSTRUCTION, load_captions
from pipeline.inference.speed import SPEED_FILE, timed_models
from pipeline.sweep.points import (
    SAMPLES,
    STEPS,
    Point,
    extra_ids,
    extra_points,
    first_points,
    point_config,
    step_control,
)
from pipeline.teacher.loading import DTYPES
from pipeline.teacher.vllm_engine import engine_version

Depends = tuple[dict[str, Any], dict[str, str]]
STUDENT_KEYS_IGNORED = ("archs", "sources", "num_workers", "seeds")  # which models run, how fast: not what one is
SCORING = "ngram+attributes+reliance"  # what a student's metrics.json holds: a change rescores every student
COMBINED_PREFIX = "gt+"  # a source gt+<dataset>: the ground truth + the dataset's captions of unlabelled images


def raw_fingerprints(root: Path, layout: str) -> dict[str, str]:
    """The raw dataset's caption files (content) and image folder (names, sizes, mtimes)."""
    files = ["captions.json"] if layout == "single" else ["train_captions.json", "test_captions.json"]
    out = {f: sha256_file(root / f) for f in files}
    out[IMAGE_DIR] = fingerprint_tree(root / IMAGE_DIR) if (root / IMAGE_DIR).is_dir() else "missing"
    return out


def prepare(cfg: Config) -> Depends:
    """`prepare`: the seed and the data section (but the unlabelled pool, which it does not read); the raw dataset at
    ``data.root``."""
    layout = detect_layout(cfg.data.root, cfg.data.layout)
    data = config_slice(cfg, "data")["data"]
    data.pop("unlabeled_pool")
    return {"seed": cfg.seed, "data": data}, raw_fingerprints(cfg.data.root, layout)


def finetune(cfg: Config, rd: RunDir) -> Depends:
    """`finetune`: the seed and the teacher section; the prepared data and the base model's JSON files."""
    inputs = {"data": require_stage(rd.data, "prepare")["fingerprint"],
              "base_model": fingerprint_tree(cfg.teacher.model, "*.json", content=True)}
    return {"seed": cfg.seed, "teacher": config_slice(cfg, "teacher")["teacher"]}, inputs


def distill(cfg: Config, rd: RunDir) -> Depends:
    """`distill` of ``cfg.distill.dataset_name``: the sampling settings, samples per image, prompt and unlabelled
    folder; the data, the teacher and the unlabelled images (names, sizes, mtimes)."""
    d = cfg.distill
    config = {"seed": cfg.seed, "temperature": d.temperature, "top_p": d.top_p, "max_new_tokens": d.max_new_tokens,
              "name": d.dataset_name, "prompt": INSTRUCTION, "backend": "transformers",
              "precision": cfg.teacher.precision, "attn_implementation": cfg.teacher.attn_implementation,
              "samples_per_image": d.samples_per_image, "unlabeled": d.unlabeled and str(d.unlabeled)}
    if d.engine != "hf":  # (the hf engine's slice is as it was before there were engines: its datasets stay current)
        config["backend"] = engine(cfg)
    inputs = {"data": require_stage(rd.data, "prepare")["fingerprint"],
              "teacher": require_stage(rd.teacher, "finetune")["fingerprint"]}
    if d.unlabeled is not None:
        inputs["unlabeled"] = fingerprint_tree(d.unlabeled) if d.unlabeled.is_dir() else "missing"
    return config, inputs


def engine(cfg: Config) -> dict[str, str]:
    """The generation engine ``distill.engine`` names, as a dataset records it: name, version and (vLLM) dtype."""
    if cfg.distill.engine == "hf":
        import transformers

        return {"name": "hf", "version": transformers.__version__}
    dtype = cfg.distill.vllm.dtype
    return {**engine_version(), "dtype": DTYPES[cfg.teacher.precision] if dtype == "auto" else dtype}


def source_dataset(source: str) -> str | None:
    """The distilled dataset a caption source reads: ``None`` for ``gt``, ``<name>`` for ``<name>`` and
    ``gt+<name>``."""
    return None if source == "gt" else source.removeprefix(COMBINED_PREFIX)


def source_dir(rd: RunDir, source: str) -> Path:
    """The folder of a caption source: the prepared data for ``gt``, else the distilled dataset it reads."""
    dataset = source_dataset(source)
    return rd.data if dataset is None else rd.distill(dataset)


def require_source(rd: RunDir, source: str) -> dict[str, Any]:
    """The manifest of the stage output a caption source reads; one line naming what to run first when missing."""
    return require_stage(source_dir(rd, source), "prepare" if source == "gt" else "distill")


def _source_inputs(rd: RunDir, source: str) -> dict[str, str]:
    """What every model of a caption source is computed from: its captions and the ground truth."""
    return {"captions": require_source(rd, source)["fingerprint"],
            "ground_truth": require_stage(rd.data, "prepare")["fingerprint"]}


def source_baselines(rd: RunDir, source: str) -> dict[str, str]:
    """A source's baselines (``students/baseline__<source>``): its captions, the ground truth and the scoring."""
    return {**_source_inputs(rd, source), "scoring": SCORING}


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def encoder_weights(cfg: Config, arch: str) -> str | None:
    """The content digest of the pretrained weights file a student's encoder loads (``"missing"`` before the demo
    builds its stand-in; None without pretrained weights): new weights retrain the student."""
    from pipeline.students.encoders import weights_file

    if not cfg.students.encoder.pretrained:
        return None
    path = weights_file(ARCHS[arch].encoder, cfg.students.encoder)
    if not path.is_file():
        return "missing"
    stat = path.stat()
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


def model_seeds(cfg: Config) -> list[int]:
    """The seeds each (architecture, source) trains with: ``students.seeds``, or the run's seed."""
    return list(cfg.students.seeds or [cfg.seed])


def student_folder(cfg: Config, rd: RunDir, arch: str, source: str, seed: int | None = None,
                   variant: str | None = None) -> Path:
    """``students/<arch>__<source>/`` for the first (or only) seed, ``<arch>__<source>__s<seed>/`` for the others;
    ``<arch>__<source>__<variant>/`` for a sweep's step control (:attr:`pipeline.sweep.points.Point.variant`)."""
    seeds = model_seeds(cfg)
    suffix = "" if seed is None or seed == seeds[0] else f"__s{seed}"
    return rd.students / f"{arch}__{source}{suffix}{f'__{variant}' if variant else ''}"


def student(cfg: Config, rd: RunDir, arch: str, source: str, seed: int | None = None) -> Depends:
    """One `students` model: its seed (default the run's), architecture, source and student settings; its captions
    and the ground truth. Every source validates on the ground truth (``validation``: distilled sources validated on
    their teacher's val captions before). Settings left at their off value (``no_repeat_ngram`` 0, ``max_steps``
    None, ``scst.epochs`` 0) are left out, so that models trained before they existed stay up to date."""
    settings = config_slice(cfg, "students")["students"]
    for key in STUDENT_KEYS_IGNORED:
        settings.pop(key)
    for key in ("no_repeat_ngram", "max_steps"):
        if not settings[key]:
            settings.pop(key)
    if not settings["scst"]["epochs"]:
        settings.pop("scst")
    inputs = {**_source_inputs(rd, source), "encoder_weights": encoder_weights(cfg, arch)}
    config = {"seed": cfg.seed if seed is None else seed, "arch": arch, "source": source, "scoring": SCORING,
              "students": settings}
    if source != "gt":
        config["validation"] = "gt"
    return config, inputs


def _train_rows(rd: RunDir, dataset: str) -> int:
    folder = rd.distill(dataset)
    require_stage(folder, "distill")
    captions = load_captions(folder / "captions")
    return len(captions["train"]) if "train" in captions else 0


def sweep_student(cfg: Config, rd: RunDir, point: Point) -> tuple[Config, Path]:
    """The config a sweep point's student trains with (:func:`~pipeline.sweep.points.point_config`; a step control's
    with the step budget of its k point, from both datasets' training captions:
    :func:`~pipeline.sweep.points.step_control`) and its folder. A step control needs the k point's dataset
    distilled: a missing one raises :class:`StageInputError` naming it."""
    pcfg = point_config(cfg, point)
    if point.kind == STEPS:
        k_dataset = Point(SAMPLES, point.temperature, point.samples).dataset
        pcfg = step_control(pcfg, _train_rows(rd, k_dataset), _train_rows(rd, point.dataset))
    return pcfg, student_folder(pcfg, rd, cfg.sweep.student, point.source, variant=point.variant)


def _finished(folder: Path, stage: str, key: Depends) -> str:
    """The fingerprint ``key`` gives, when ``folder`` is finished with exactly it; else one line naming it."""
    wanted = stage_fingerprint(*key)
    if require_stage(folder, stage)["fingerprint"] != wanted:
        raise StageInputError(f"{folder}: made with other settings or inputs; run the '{stage}' stage")
    return wanted


def sweep(cfg: Config, rd: RunDir) -> Depends:
    """`sweep`: the seed and sweep section; the fingerprint every point's distilled dataset and student must have
    (each finished with exactly it), the points at the best temperature as ``sweep/best.json`` names it."""
    points = first_points(cfg.sweep)
    if extra_ids(cfg.sweep):
        best_file = rd.sweep / "best.json"
        if not best_file.is_file():
            raise StageInputError(f"{best_file}: missing; the temperature is not chosen yet")
        best = json.loads(best_file.read_text())
        points += extra_points(cfg.sweep, best["temperature"], best["samples_temperature"])
    inputs = {}
    for point in points:
        pcfg, folder = sweep_student(cfg, rd, point)
        if point.dataset is not None:
            inputs[f"distill/{point.dataset}"] = _finished(rd.distill(point.dataset), "distill", distill(pcfg, rd))
        inputs[f"students/{folder.name}"] = _finished(folder, "students",
                                                      student(pcfg, rd, cfg.sweep.student, point.source))
    return {"seed": cfg.seed, "sweep": config_slice(cfg, "sweep")["sweep"]}, inputs


def speed(cfg: Config, rd: RunDir) -> Depends:
    """`speed` (or `make bench`'s speed section): the fingerprints of the teacher and the best student of each
    source (:func:`~pipeline.inference.speed.timed_models`); how thoroughly, or how many more models, were timed is
    not part of it (a bench measurement stays current)."""
    return {}, timed_models(rd)


def report(cfg: Config, rd: RunDir) -> Depends:
    """`report`: the seed and report section; every finished student (but the sweep's) and distilled dataset of the
    run, its timings (``speed/speed.json``, from the `speed` step or `make bench`) and its finished sweep."""
    inputs = {}
    for folder in sorted(rd.students.glob("*__*")):
        manifest = read_manifest(folder)
        if (manifest is not None and not folder.name.startswith("baseline__")
                and not is_sweep_source(folder.name.split("__", 1)[1])):
            inputs[folder.name] = manifest["fingerprint"]
    inputs.update({f"distill/{n}": require_stage(rd.distill(n), "distill")["fingerprint"]
                   for n in rd.distilled_sources()})
    if (rd.speed / SPEED_FILE).is_file():
        inputs["speed"] = sha256_file(rd.speed / SPEED_FILE)
    if (sweep_manifest := read_manifest(rd.sweep)) is not None:
        inputs["sweep"] = sweep_manifest["fingerprint"]
    return {"seed": cfg.seed, "report": config_slice(cfg, "report")["report"]}, inputs
