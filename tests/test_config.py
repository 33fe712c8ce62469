from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.run_dir and cfg.data.root and cfg.teacher.model
    assert cfg.students.archs


def test_dotted_overrides_are_typed(make_config):
    cfg = load_config(make_config(), ["distill.temperature=0.9", "students.archs=[vgg19_gru]", "seed=7",
                                      "distill.name=creative", "data.split.val=0.25"])
    assert cfg.distill.temperature == 0.9 and cfg.seed == 7
    assert cfg.students.archs == ["vgg19_gru"]
    assert cfg.distill.dataset_name == "creative"
    assert cfg.data.split.val == 0.25


def test_paths_inside_the_run_follow_a_run_dir_override(tmp_path):
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    cfg = load_config(demo)
    assert cfg.data.root == Path("runs/demo/deepfashion-lite") and cfg.teacher.model == Path("runs/demo/tiny-llava")
    other = load_config(demo, ["run_dir=runs/other"])
    assert other.data.root == Path("runs/other/deepfashion-lite")
    assert other.teacher.model == Path("runs/other/tiny-llava")
    with pytest.raises(ConfigError, match="run_dir cannot refer"):
        load_config(demo, ["run_dir=${run_dir}/x"])


def test_default_distill_name_follows_temperature(make_config):
    assert load_config(make_config(), ["distill.temperature=0.2"]).distill.dataset_name == "precise"
    assert load_config(make_config(), ["distill.temperature=0.9"]).distill.dataset_name == "creative"


@pytest.mark.parametrize("override, key", [
    ("distill.temprature=0.2", "distill.temprature"),          # unknown key
    ("distill.temperature=hot", "distill.temperature"),        # wrong type
    ("students.batch_size=0", "students.batch_size"),          # out of range
    ("data.on_bad_record=ignore", "data.on_bad_record"),       # not an allowed value
    ("nosuchsection.x=1", "nosuchsection"),
])
def test_bad_values_name_the_key(make_config, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(make_config(), [override])
    assert key in str(err.value)


def test_missing_required_value_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: x\ndata: {root: y}\n")
    with pytest.raises(ConfigError, match="teacher"):
        load_config(path)


def test_malformed_override_and_file(tmp_path, make_config):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(make_config(), ["seed"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
