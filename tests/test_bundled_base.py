"""The demo's bundled pretrained tiny LLaVA (pipeline/demo/resources/tiny-llava): used only where a build would use
exactly the same inputs, and current for configs/demo.yaml."""

import json
import logging
from argparse import Namespace

import pytest

import pipeline.demo.tiny_llava as tiny_llava
from pipeline.core.config import load_config
from pipeline.data.formats import load_captions, split_rows
from pipeline.demo.base_model import BUNDLED, ensure_base_model, tokenizer_texts
from stages import prepare
from tests.helpers import ROOT, write_config


def _train_captions(cfg) -> list[str]:
    return [r["caption"] for r in split_rows(load_captions(cfg.run_dir / "data" / "captions"), "train")]


def test_a_matching_bundle_is_copied_and_other_settings_build(tmp_path, monkeypatch, caplog):
    cfg = load_config(write_config(tmp_path))
    prepare.run(cfg, Namespace(force=False))
    captions = _train_captions(cfg)
    built = ensure_base_model(cfg, captions, bundled=None)  # random weights: instant
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for f in built.iterdir():
        if not f.name.startswith("."):
            (bundle / f.name).write_bytes(f.read_bytes())

    builds = []
    monkeypatch.setattr(tiny_llava, "build_tiny_llava", lambda *a, **k: builds.append(a))
    copy = load_config(write_config(tmp_path, teacher={"model": str(tmp_path / "copied")}))
    with caplog.at_level(logging.INFO, logger="pipeline.demo.base_model"):
        assert ensure_base_model(copy, captions, bundled=bundle) == tmp_path / "copied"
    assert not builds and "bundled pretrained base" in caplog.text
    assert (tmp_path / "copied" / "model.safetensors").read_bytes() == (bundle / "model.safetensors").read_bytes()
    owned = json.loads((tmp_path / "copied" / ".fashion-distill.json").read_text())["entries"]
    assert "model.safetensors" in owned
    # other tokenizer texts, another seed, another shape: each builds instead
    def other(**sections):
        return load_config(write_config(tmp_path, **sections))

    for cfg_other, texts in ((other(teacher={"model": str(tmp_path / "t")}), captions[1:]),
                             (other(seed=1, teacher={"model": str(tmp_path / "s")}), captions),
                             (other(teacher={"model": str(tmp_path / "h"), "tiny": {"hidden_size": 64}}), captions)):
        ensure_base_model(cfg_other, texts, bundled=bundle)
    assert len(builds) == 3


@pytest.mark.slow
def test_the_bundle_is_current_for_the_demo_config(tmp_path):
    """Fails when configs/demo.yaml, the tiny LLaVA's recipe or the demo's data change without a new bundle
    (`scripts/bundle_tiny_llava.py`): the demo would then build its base itself (~6 more minutes)."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"run_dir={tmp_path / 'run'}"])
    prepare.run(cfg, Namespace(force=False))
    settings = tiny_llava.tiny_settings(cfg.teacher.tiny, cfg.seed, cfg.data.pretraining.root,
                                        tokenizer_texts(_train_captions(cfg)))
    assert tiny_llava.built_with(BUNDLED, settings)
    figures = json.loads((BUNDLED / tiny_llava.RECORD).read_text())["pretraining"]
    assert min(figures["vision_held_out_accuracy"].values()) > 0.85 and figures["language_last_loss"] < 0.6
    assert sorted(p.name for p in BUNDLED.iterdir()) == sorted(
        ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
         "processor_config.json", tiny_llava.RECORD, "tokenizer.json", "tokenizer_config.json"])
