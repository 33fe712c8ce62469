"""A stage replaces only what it wrote, whatever state a kill left its folder in (never written, half written,
finished, finished and then edited by a user), and a killed stage resumes to the result of an uninterrupted run.

The stage tests run each stage as a user does, in a process (``tests/killed_stage.py``) that checks at every file
change under the run folder that the new entry is already listed in its folder's marker, and that sends itself
SIGKILL at chosen changes; after each kill a user's file put into the output folder stops the rerun (also with
``--force``) with one line naming it, and without it the rerun ends where the uninterrupted run did.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

from pipeline.core.config import load_config
from pipeline.core.rundir import (
    OWNER_FILE,
    WORK_STAMP,
    ForeignDataError,
    atomic_write_json,
    atomic_write_text,
    publish_dir,
    record_entries,
    require_replaceable,
    reset_work_dir,
    write_manifest,
)
from stages.cli import stage_main
from tests.helpers import ROOT

CFG, INPUTS = {"a": 1}, {"x": "1"}


def _refused(folder: Path, entry: Path) -> None:
    with pytest.raises(ForeignDataError, match=f"^{entry} "):
        reset_work_dir(folder, CFG, INPUTS, force=True)
    with pytest.raises(ForeignDataError, match=f"^{entry} "):
        reset_work_dir(folder, {"a": 2}, INPUTS, force=False)


def test_a_settings_file_alone_proves_nothing(tmp_path):
    """The probe's case: a killed run's ``.settings`` (or a user's folder that happens to hold one) is not proof."""
    work = tmp_path / "distill" / "precise"
    work.mkdir(parents=True)
    (work / WORK_STAMP).write_text("0" * 64)
    (work / "mine.txt").write_text("mine")
    _refused(work, work)
    (work / "mine.txt").unlink()
    _refused(work, work)  # nothing lists .settings either
    assert sorted(p.name for p in work.iterdir()) == [WORK_STAMP]


def test_every_half_written_state_refuses_a_users_file(tmp_path):
    """A resumable folder cut at each step of its life: the user's file stops a reset, at any depth."""
    work = tmp_path / "work"
    reset_work_dir(work, CFG, INPUTS, force=False)
    states = [lambda: None,  # only the marker and .settings
              lambda: record_entries(work, ["generations.jsonl"]),  # listed, not yet opened
              lambda: (work / "generations.jsonl").write_text('{"image_id": "a", "sample": 0}\n{"ima'),  # torn
              lambda: atomic_write_json(work / "last" / "state.json", {"epoch": 1}),  # a made subfolder
              lambda: (record_entries(work, ["tensorboard"]), (work / "tensorboard").mkdir(),
                       (work / "tensorboard" / "events.out").write_text("x")),  # a library's folder
              lambda: write_manifest(work, stage="s", config=CFG, inputs=INPUTS, started=time.time())]
    for i, step in enumerate(states):
        step()
        for where in (work, work / "last", work / "tensorboard"):
            if not where.is_dir() or (where.name == "tensorboard" and not (where / OWNER_FILE).exists()):
                continue  # a library's folder is checked once the stage has finished (sealed by the manifest)
            mine = where / "mine.txt"
            mine.write_text("mine")
            _refused(work, mine)
            assert mine.read_text() == "mine", (i, where)
            mine.unlink()
        require_replaceable(work)
    assert json.loads((work / "tensorboard" / OWNER_FILE).read_text())["entries"][-1] == "events.out"
    reset_work_dir(work, {"a": 2}, INPUTS, force=False)  # its own finished output: replaced
    assert not (work / "generations.jsonl").exists() and (work / WORK_STAMP).is_file()


def test_a_kill_during_a_wipe_leaves_nothing_in_the_way(tmp_path):
    work = tmp_path / "work"
    reset_work_dir(work, CFG, INPUTS, force=False)
    atomic_write_text(work / "a.txt", "a")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.replace(work, tmp_path / f".work.old-{dead.pid}")  # what a wipe killed after its rename leaves
    reset_work_dir(work, CFG, INPUTS, force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_a_file_added_into_a_published_folder_is_refused(tmp_path):
    final = tmp_path / "report"
    with publish_dir(final) as tmp:
        (tmp / "plots").mkdir()
        (tmp / "plots" / "a.png").write_text("png")
    (final / "plots" / "mine.png").write_text("mine")
    with pytest.raises(ForeignDataError, match=f"^{final / 'plots' / 'mine.png'} was not written"):
        with publish_dir(final):
            pass
    assert (final / "plots" / "mine.png").read_text() == "mine"


def _record(folder: str, prefix: str) -> None:
    for i in range(40):
        record_entries(folder, [f"{prefix}-{i}"])


def test_parallel_shards_record_their_entries_without_losing_any(tmp_path):
    work = tmp_path / "work"
    reset_work_dir(work, CFG, INPUTS, force=False)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_record, args=(str(work), f"shard-{i}")) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    listed = set(json.loads((work / OWNER_FILE).read_text())["entries"])
    assert {f"shard-{i}-{j}" for i in range(4) for j in range(40)} <= listed


# --- every stage, run as a user runs it, killed at several points ----------------------------------------------

def _run_watched(stage: str, args: list[str], log: Path, watch: Path, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.killed_stage", str(log), str(watch), str(kill_at), stage,
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _in_process(stage: str, args: list[str], capsys) -> tuple[int, str]:
    import importlib

    module = importlib.import_module(f"stages.{stage}")
    capsys.readouterr()
    rc = stage_main(stage, module.run, getattr(module, "add_args", None), argv=args)
    return rc, capsys.readouterr().err


def _error_line(err: str, stage: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"{stage}: error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _kills(stage: str, args: list[str], out: Path, watch: Path, tmp_path: Path, capsys, result, points: int = 3,
           resume_args: list[str] | None = None) -> None:
    """Run ``stage`` once watched (no entry appears unlisted), then kill it at ``points`` spread changes; after each
    kill a user's file in ``out`` is refused (with --force too) and the rerun reproduces ``result(out)``."""
    log = tmp_path / f"{stage}-reference.log"
    ref = _run_watched(stage, args, log, watch, 0)
    assert ref.returncode == 0, ref.stderr[-3000:]
    events = log.read_text().splitlines()
    assert events and [e for e in events if e.endswith("UNLISTED")] == []
    expected = result(out)
    n = len(events)
    for k in sorted({max(1, n * (i + 1) // (points + 1)) for i in range(points)}):
        log = tmp_path / f"{stage}-kill-{k}.log"
        killed = _run_watched(stage, args, log, watch, k)
        assert killed.returncode == -9, (k, killed.stderr[-3000:])
        assert log.read_text().splitlines()[-1].startswith("killed ")
        out.mkdir(parents=True, exist_ok=True)
        mine = out / "mine.txt"
        mine.write_text("mine")
        rc, err = _in_process(stage, [*args, "--force"] if "--force" not in args else args, capsys)
        line = _error_line(err, stage)
        assert rc == 1 and (f"{mine} was not written" in line or f"{out} exists and was not written" in line), line
        assert mine.read_text() == "mine"
        mine.unlink()
        rc, err = _in_process(stage, resume_args if resume_args is not None else args, capsys)
        assert rc == 0, (k, err[-3000:])
        assert result(out) == expected, k


def _students_config(make_config):
    return make_config(students={"archs": ["vgg19_gru"], "epochs": 3, "batch_size": 8, "val_every_epochs": 1,
                                 "early_stop_patience": 9, "beam_size": 1, "dropout": 0.5,
                                 "encoder": {"pretrained": False, "width": 0.125, "image_size": 32}},
                       report={"gallery_size": 2})


def _prepared(out: Path) -> dict:
    return {name: (out / name).read_text() for name in ("stats.json", "llava_train.json", "karpathy.json")}


def _student(out: Path) -> dict:
    from safetensors.torch import load_file

    weights = {f"{d}/{k}": v.tolist() for d in ("best", "last") for k, v in load_file(out / d /
                                                                                    "model.safetensors").items()}
    metrics = json.loads((out / "metrics.json").read_text())
    return {"predictions": (out / "predictions.jsonl").read_text(), "weights": weights, "test": metrics["test"],
            "curves": (out / "curves.json").read_text()}


@pytest.mark.slow
def test_prepare_students_report_and_export_killed_anywhere(make_config, tmp_path, capsys):
    """prepare (data/), students (students/<arch>__<source>/), report (report/), export (best/onnx/): each killed
    at three points, a user's file refused after each kill, the rerun equal to the uninterrupted run (students:
    weights of best/ and last/, predictions and curves, bit for bit, dropout 0.5)."""
    path = _students_config(make_config)
    cfg = load_config(path)
    run = cfg.run_dir
    args = ["--config", str(path)]
    from stages import prepare

    prepare.run(cfg, Namespace(force=False, wait=False))  # the raw data is rendered once, outside the run folder
    _kills("prepare", [*args, "--force"], run / "data", run, tmp_path, capsys, _prepared, resume_args=args)
    student = run / "students" / "vgg19_gru__gt"
    _kills("students", [*args, "--force"], student, run, tmp_path, capsys, _student, resume_args=args)
    _kills("report", [*args, "--force"], run / "report", run, tmp_path, capsys,
           lambda out: (out / "results.csv").read_text(), resume_args=args)
    best = student / "best"
    _kills("export", [*args, "--student", str(best), "--force"], best / "onnx", run, tmp_path, capsys,
           lambda out: sorted(p.name for p in out.iterdir()), resume_args=[*args, "--student", str(best)])
    # finished, then edited by a user at any depth: refused, nothing touched
    for mine in (student / "tensorboard" / "mine.txt", best / "mine.txt", run / "data" / "captions" / "mine.txt"):
        mine.write_text("mine")
        stage = "prepare" if "data" in mine.parts else "students"
        rc, err = _in_process(stage, [*args, "--force"], capsys)
        assert rc == 1 and f"{mine} was not written by fashion-distill" in _error_line(err, stage)
        assert mine.read_text() == "mine" and (run / "data" / "manifest.json").is_file()
        mine.unlink()
    shutil.rmtree(tmp_path / "raw", ignore_errors=True)
