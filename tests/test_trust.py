"""A student folder a user can trust and share: weights as readable as the other outputs, a full disk or a damaged
or edited file reported in one line naming the file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import PipelineError
from pipeline.students.checkpoint import load_student
from pipeline.students.train import train_student
from pipeline.students.vocab import Vocabulary
from stages.cli import os_error_line, stage_main
from tests.helpers import SMALL, make_student, write_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return make_student(tmp_path_factory.mktemp("trust") / "best", "vgg19_gru")


@pytest.fixture
def student(saved, tmp_path) -> Path:
    """A copy of a student folder as the students stage saves it, to damage."""
    return Path(shutil.copytree(saved, tmp_path / "best"))


def test_weights_are_as_readable_as_the_other_outputs(saved):
    best = saved
    modes = {p.name: p.stat().st_mode & 0o777 for p in best.iterdir() if not p.name.startswith(".")}
    umask = os.umask(0)
    os.umask(umask)
    assert modes["model.safetensors"] == modes["encoder.safetensors"] == modes["student.json"] == 0o666 & ~umask


@pytest.mark.parametrize("name", ["model.safetensors", "encoder.safetensors"])
def test_a_truncated_weights_file_is_one_line_naming_it(student, name):
    best = student
    data = (best / name).read_bytes()
    (best / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match=rf"^{best / name}: not a readable safetensors file \(.*\); retrain"):
        load_student(best)


@pytest.mark.parametrize("key, value, shown", [
    ("arch", "lstm_9000", "arch: 'lstm_9000'"),
    ("format_version", 1, "format_version 1: this code reads format 2"),
    ("format_version", "2", "format_version '2': this code reads format 2"),
    ("format_version", 3, "format_version 3 is newer than this code reads"),
    ("image.size", -32, "image.size: -32 is not a valid value"),
    ("image.std", [0.2, 0, 0.2], "image.std: [0.2, 0, 0.2] is not a valid value"),
    ("encoder.name", "vit_b_16", "encoder.name: 'vit_b_16' is not a valid value"),
    ("max_length", 0, "max_length: 0 is not a valid value"),
])
def test_an_edited_student_json_is_one_line_naming_the_key(student, key, value, shown):
    best = student
    meta = json.loads((best / "student.json").read_text())
    node, *path = key.split(".")
    if path:
        meta[node][path[0]] = value
    else:
        meta[node] = value
    (best / "student.json").write_text(json.dumps(meta))
    with pytest.raises(PipelineError, match="^" + str(best / "student.json").replace(".", r"\.") + ": "
                       + shown.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_student(best)


@pytest.fixture
def small_disk(tmp_path, request):
    """A 256 KiB tmpfs (root only; another size by indirect parametrization): a real full disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    size = getattr(request, "param", "256k")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True
                      ).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_while_training_a_student_names_the_file(small_disk):
    caps = {"train": [f"the lady wears a {c} hat ." for c in ("red", "blue", "green", "big")] * 8,
            "val": ["the lady wears a red hat ."] * 4}
    vocab = Vocabulary.build(caps["train"], 1)
    table = {"train": torch.randn(32, 16), "val": torch.randn(4, 16)}
    cfg = SMALL.model_copy(update={"epochs": 2, "batch_size": 8, "hidden_dim": 256, "embed_dim": 256})

    class Scorer:
        def score(self, refs, hyps, only=None):
            return {"CIDEr-D": 0.5}

    out = small_disk / "student"
    with pytest.raises(OSError) as err:
        train_student("vgg19_gru", cfg, lambda s, idx: table[s][idx], 16, caps, vocab, out, 0, Scorer())
    assert err.value.errno == errno.ENOSPC
    line = os_error_line(err.value)
    assert line.startswith(str(small_disk)) and line.endswith(": No space left on device"), line
    assert Path(err.value.filename).name == "model.safetensors" and "\n" not in line


@pytest.fixture(scope="module")
def raw_dataset(tmp_path_factory) -> Path:
    """A generated DeepFashion-lite folder (the tests' size) to prepare."""
    from stages import prepare

    cfg = write_config(tmp_path_factory.mktemp("raw"))
    assert stage_main("prepare", prepare.run, argv=["--config", str(cfg)]) == 0
    return cfg


@pytest.mark.parametrize("small_disk, key, names", [
    ("32k", "run_dir", "/captions"),  # `datasets`' save_to_disk fails inside fsspec, naming no file
    ("128k", "run_dir", ".json"),
    ("16k", "data.root", ".jpg"),  # DeepFashion-lite rendered into a full disk
], indirect=["small_disk"])
def test_a_full_disk_during_prepare_names_the_file(small_disk, raw_dataset, key, names, capsys):
    from stages import prepare

    overrides = [f"{key}={small_disk / 'out'}"] + ([f"data.root={raw_dataset.parent / 'raw'}"] if key == "run_dir"
                                                   else [])
    capsys.readouterr()
    assert stage_main("prepare", prepare.run, argv=["--config", str(raw_dataset), *overrides]) == 1
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith(f"prepare: error: {small_disk}/"), err[-2000:]
    assert line.endswith(f"{names}: No space left on device"), line
    assert not [p for p in small_disk.rglob("*") if ".tmp-" in p.name]  # the half-written folder is gone


def test_a_truncated_feature_cache_is_recomputed_with_one_line(tmp_path, monkeypatch, caplog):
    from pipeline.core.config import EncoderSettings
    from pipeline.students import features as features_mod
    from tests.helpers import varied_images

    paths = []
    for i, image in enumerate(varied_images(3)):
        image.save(tmp_path / f"img{i}.png")
        paths.append(str(tmp_path / f"img{i}.png"))
    calls = []
    real = features_mod.compute_features
    monkeypatch.setattr(features_mod, "compute_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    settings, cache = EncoderSettings(width=0.125, image_size=32), tmp_path / "features"
    first, _ = features_mod.cached_features(cache, "vgg19", settings, 0, paths)
    (file,) = cache.glob("*.safetensors")
    data = file.read_bytes()
    for damaged in (data[: len(data) // 2], data[:5], b""):  # cut short by a full disk or a copy
        file.write_bytes(damaged)
        caplog.clear()
        again, _ = features_mod.cached_features(cache, "vgg19", settings, 0, paths)
        assert torch.equal(again, first) and file.stat().st_size == len(data)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and warnings[0].startswith(f"{file}: damaged feature cache (")
        assert warnings[0].endswith("); recomputing it") and "\n" not in warnings[0]
    assert len(calls) == 4


class _Crash(Exception):
    pass


@pytest.mark.parametrize("name, cut", [("optimizer.pt", 2), ("optimizer.pt", 0), ("state.json", 2),
                                       ("rng.json", 2)])
def test_a_damaged_resume_file_is_one_line_naming_it(tmp_path, name, cut):
    caps = {"train": [f"the lady wears a {c} hat ." for c in ("red", "blue", "green", "big")] * 8,
            "val": ["the lady wears a red hat ."] * 4}
    vocab = Vocabulary.build(caps["train"], 1)
    table = {"train": torch.randn(32, 16), "val": torch.randn(4, 16)}
    cfg = SMALL.model_copy(update={"epochs": 4, "batch_size": 8, "val_every_epochs": 1, "early_stop_patience": 9})

    class CrashingScorer:
        calls = 0

        def score(self, refs, hyps, only=None):
            CrashingScorer.calls += 1
            if CrashingScorer.calls == 3:
                raise _Crash  # killed during epoch 3, after epoch 2's last/
            return {"CIDEr-D": 0.5}

    run = lambda: train_student("vgg19_gru", cfg, lambda s, idx: table[s][idx], 16, caps, vocab, tmp_path, 0,  # noqa: E731
                                CrashingScorer())
    with pytest.raises(_Crash):
        run()
    path = tmp_path / "last" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // cut] if cut else b"")
    with pytest.raises(PipelineError) as err:
        run()
    line = str(err.value)
    assert line.startswith(f"{path}: unreadable (") and line.endswith("rerun with --force to train this student "
                                                                      "from the start") and "\n" not in line
