import json

import pytest

from pipeline.rundir import (StageInputError, atomic_write_json, is_up_to_date, publish_dir, require_stage,
                             write_manifest)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_publish_dir_keeps_previous_output_when_interrupted(tmp_path):
    final = tmp_path / "out"
    with publish_dir(final) as tmp:
        (tmp / "f.txt").write_text("v1")
    with pytest.raises(KeyboardInterrupt):
        with publish_dir(final) as tmp:
            (tmp / "f.txt").write_text("half")
            raise KeyboardInterrupt
    assert (final / "f.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_manifest_written_last_controls_skip(tmp_path):
    stage = tmp_path / "stage"
    with pytest.raises(StageInputError, match="run the 'prepare' stage first"):
        require_stage(stage, "prepare")
    stage.mkdir()
    cfg, inputs = {"a": 1}, {"raw": "abc"}
    assert not is_up_to_date(stage, cfg, inputs)
    m = write_manifest(stage, stage="prepare", config=cfg, inputs=inputs, started=0.0, figures={"n": 3})
    assert m["versions"]["torch"] and m["wall_time_s"] > 0
    assert is_up_to_date(stage, cfg, inputs)
    assert not is_up_to_date(stage, {"a": 2}, inputs)
    assert not is_up_to_date(stage, cfg, {"raw": "changed"})
    assert require_stage(stage, "prepare")["figures"] == {"n": 3}
