import re
from pathlib import Path

import pytest

from pipeline.core.config import ConfigError, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.run_dir == Path("runs") / path.stem  # each config writes its own run folder
    assert not cfg.data.root.is_relative_to(cfg.run_dir / "data") and cfg.teacher.model.name
    assert set(cfg.students.archs) <= {"vgg19_gru", "resnet101_gru", "resnet101_attn_gru", "vit_transformer"}


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
    ("students.decoder_lr=-5", "students.decoder_lr"),
    ("students.encoder_lr=0", "students.encoder_lr"),
    ("distill.temperature=.inf", "distill.temperature"),
    ("distill.temperature=.nan", "distill.temperature"),
    ("distill.top_p=0", "distill.top_p"),
    ("students.embed_dim=0", "students.embed_dim"),
    ("students.grad_clip=-1", "students.grad_clip"),
    ("students.attention_reg=-0.1", "students.attention_reg"),
    ("slurm.distill_shards=0", "slurm.distill_shards"),
    ("slurm.nodes.finetune=0", "slurm.nodes.finetune"),
    ("seed=true", "seed"),
    ("seed=-1", "seed"),
    ("students.epochs=2.5", "students.epochs"),
    ("students.encoder.pretrained=1", "students.encoder.pretrained"),
    ("teacher.train.learning_rate=.inf", "teacher.train.learning_rate"),
    ("teacher.train.max_steps=-2", "teacher.train.max_steps"),
    ("teacher.tiny.hidden_size=130", "teacher.tiny.hidden_size"),  # not divisible by num_heads
    ("students.hidden_dim=130", "students.hidden_dim"),  # not divisible by transformer_heads
    ("students.encoder.image_size=40", "students.encoder.image_size"),  # the ViT's patches are 16 px
    ("distill.temperatures.hot=-1", "distill.temperatures.hot"),
    ("distill.name=../../elsewhere", "distill.name"),  # a folder name inside the run, nothing else
    ("data.synthetic.num_images=0", "data.synthetic.num_images"),
    ("distill.samples_per_image=0", "distill.samples_per_image"),
    ("students.sources=[gt, gt+]", "students.sources.1"),  # gt+<dataset>, and a dataset name is a folder name
])
def test_bad_values_name_the_key(make_config, override, key):
    path = make_config()
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    # the source that set the key (the override, or the file for a cross-field check), then the key
    assert re.match(rf"({re.escape(str(path))}|override): {re.escape(key)}: ", str(err.value)), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key, where", [("data.root", "data/raw"), ("data.root", "report"),
                                        ("teacher.model", "teacher/base"), ("data.root", "distill/x"),
                                        ("distill.unlabeled", "students/photos")])
def test_inputs_inside_an_output_folder_are_refused(make_config, key, where):
    path = make_config()
    run_dir = load_config(path).run_dir
    with pytest.raises(ConfigError, match=rf"^override: {key}: {run_dir / where} is inside {run_dir}/"):
        load_config(path, [f"{key}={run_dir / where}"])
    assert load_config(path, [f"{key}={run_dir / 'inputs'}"])  # beside the outputs is fine


def test_several_greedy_samples_per_image_are_refused(make_config):
    path = make_config()
    with pytest.raises(ConfigError, match=r"^override: distill.samples_per_image: 3 samples at distill.temperature=0 "
                                          r"would be identical \(greedy\)"):
        load_config(path, ["distill.samples_per_image=3", "distill.temperature=0"])
    assert load_config(path, ["distill.samples_per_image=3", "distill.temperature=0.7"]).distill.samples_per_image == 3


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


def test_recipe_config_is_the_full_config_with_its_delta():
    """configs/llava-recipe-13b.yaml names deepfashion-13b.yaml as its base; resolved, it is the full config it
    was before (77 lines) with LLaVA-1.5's LoRA recipe."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    full, recipe = load_config(configs / "deepfashion-13b.yaml"), load_config(configs / "llava-recipe-13b.yaml")
    assert full.run_dir == Path("runs/deepfashion-13b") and full.teacher.lora.r == 64
    assert full.teacher.train.deepspeed == Path("configs/deepspeed/zero2.json")
    expected = full.model_dump()
    expected["run_dir"] = Path("runs/llava-recipe-13b")
    expected["teacher"]["lora"].update(r=128, alpha=256)
    expected["teacher"]["train"].update(learning_rate=2e-4, projector_learning_rate=2e-5,
                                        deepspeed=Path("configs/deepspeed/zero3.json"))
    assert recipe.model_dump() == expected


def _write(folder: Path, name: str, text: str) -> Path:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def test_base_chain_merges_mappings_and_replaces_lists(tmp_path):
    _write(tmp_path, "root.yaml", "run_dir: r\nseed: 1\ndata: {root: d, workers: 3}\nteacher: {model: m}\n"
                                  "students: {archs: [vgg19_gru, vit_transformer], epochs: 4}\n")
    _write(tmp_path, "mid/mid.yaml", "base: ../root.yaml\nseed: 2\ndata: {split: {val: 0.2}}\n")
    leaf = _write(tmp_path, "mid/leaf.yaml", "base: mid.yaml\nstudents: {archs: [resnet101_gru]}\n")
    cfg = load_config(leaf, ["data.workers=5"])
    assert (cfg.seed, cfg.data.root, cfg.data.workers, cfg.data.split.val) == (2, Path("d"), 5, 0.2)
    assert cfg.students.archs == ["resnet101_gru"] and cfg.students.epochs == 4


@pytest.mark.parametrize("child, overrides, message", [
    ("base: base.yaml\nstudents: {epochs: 3, batch_sise: 8}\n", [],
     "{dir}/child.yaml: students.batch_sise: unknown key$"),
    ("base: base.yaml\n", [], "{dir}/base.yaml: students.epochs: "),  # a bad value the child inherits
    ("base: base.yaml\n", ["students.epochs=2", "distill.temperature=hot"], "override: distill.temperature: "),
    ("base: loop.yaml\n", [], "{dir}/loop.yaml: base: child.yaml leads back to {dir}/child.yaml \\(a cycle\\)"),
    ("base: nope.yaml\n", [], "{dir}/child.yaml: base: config file {dir}/nope.yaml does not exist"),
    ("base: [base.yaml]\n", [], "{dir}/child.yaml: base: expected the path of a config file"),
])
def test_config_errors_name_the_file_the_key_came_from(tmp_path, child, overrides, message):
    (tmp_path / "base.yaml").write_text("run_dir: r\ndata: {root: d}\nteacher: {model: m}\nstudents: {epochs: 0}\n")
    (tmp_path / "loop.yaml").write_text("base: child.yaml\n")
    (tmp_path / "child.yaml").write_text(child)
    with pytest.raises(ConfigError, match="^" + message.replace("{dir}", re.escape(str(tmp_path.resolve())))):
        load_config(tmp_path.resolve() / "child.yaml", overrides)


def test_stand_in_settings_per_encoder_family():
    """``by_encoder`` gives one family its own stand-in training; the others keep the shared settings; an unknown
    family or key is refused."""
    from pydantic import ValidationError

    from pipeline.core.config import EncoderStandIn

    stand_in = EncoderStandIn(epochs=5, learning_rate=2e-3, by_encoder={"vgg19": {"epochs": 10, "learning_rate": 1e-3}})
    assert (stand_in.of("vgg19").epochs, stand_in.of("vgg19").learning_rate) == (10, 1e-3)
    assert (stand_in.of("resnet101").epochs, stand_in.of("resnet101").learning_rate) == (5, 2e-3)
    assert stand_in.of("vgg19").batch_size == stand_in.batch_size and not stand_in.of("vgg19").by_encoder
    for bad in ({"vgg": {"epochs": 2}}, {"vgg19": {"epoch": 2}}, {"vgg19": {"epochs": 0}}):
        with pytest.raises(ValidationError):
            EncoderStandIn(by_encoder=bad)


def test_yaml_aliases_are_refused_before_they_expand(tmp_path, make_config):
    """A "billion laughs" alias bomb (9^9 strings from 10 lines) is refused in one line, in a file or an override."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"^{bomb}: not valid YAML: line 2, column \d+: aliases \(\*a0\) are "
                                          r"not allowed in a config; write the value out$"):
        load_config(bomb)
    with pytest.raises(ConfigError, match=r"^override students.archs: .*aliases \(\*x\) are not allowed"):
        load_config(make_config(), ["students.archs=[&x vgg19_gru, *x]"])
    assert load_config(make_config(), ["students.archs=[vgg19_gru]"]).students.archs == ["vgg19_gru"]


def test_no_students_to_train_is_refused(make_config):
    with pytest.raises(ConfigError, match=r"^override: students.archs: List should have at least 1 item"):
        load_config(make_config(), ["students.archs=[]"])
    with pytest.raises(ConfigError, match=r"config.yaml: students.archs: List should have at least 1 item"):
        load_config(make_config(students={"archs": []}))


def test_a_cross_field_error_blames_where_its_keys_were_set(make_config):
    """distill.samples_per_image > 1 at distill.temperature 0: the overrides are blamed when both came from there."""
    path = make_config()
    with pytest.raises(ConfigError, match=r"^override: distill.samples_per_image: 3 samples at distill.temperature"):
        load_config(path, ["distill.temperature=0", "distill.samples_per_image=3"])
    path = make_config(distill={"samples_per_image": 3})
    with pytest.raises(ConfigError, match=rf"^{path}: distill.samples_per_image: 3 samples"):
        load_config(path, ["distill.temperature=0"])
