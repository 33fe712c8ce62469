"""The held-out images of the demo's pretraining stand-ins: real captions in no split, rendered once per settings."""

import json

import pytest

from pipeline.core.config import ConfigError, SyntheticData
from pipeline.demo.synthetic import generate_held_out, load_caption_pool


def test_held_out_images_avoid_the_dataset_and_are_rendered_once(tmp_path):
    pool = load_caption_pool()
    names = sorted(set(pool["train"]) | set(pool["test"]))
    exclude = set(names[:-40])  # only 40 captions are left to choose from
    root = tmp_path / "held-out"
    cfg = SyntheticData(image_size=32)
    generate_held_out(root, "pretraining", 12, cfg, seed=0, exclude=exclude, workers=1)
    captions = json.loads((root / "captions.json").read_text())
    assert len(captions) == 12 and not set(captions) & exclude
    assert sorted(p.name for p in (root / "images").iterdir() if not p.name.startswith(".")) == sorted(captions)
    stamp = (root / "captions.json").stat().st_mtime_ns
    generate_held_out(root, "pretraining", 12, cfg, seed=0, exclude=exclude, workers=1)
    assert (root / "captions.json").stat().st_mtime_ns == stamp  # same settings: nothing rendered again
    generate_held_out(root, "pretraining", 8, cfg, seed=0, exclude=exclude, workers=1)
    assert len(json.loads((root / "captions.json").read_text())) == 8
    other = tmp_path / "other"
    generate_held_out(other, "unlabeled", 12, cfg, seed=0, exclude=exclude, workers=1)
    assert json.loads((other / "captions.json").read_text()).keys() != captions.keys()  # each purpose its own draw


def test_attribute_list_answers_read_back_into_the_labels_of_every_real_caption():
    from pipeline.demo.tiny_pretrain import attribute_list, read_attribute_list
    from pipeline.evaluation.attributes import caption_labels

    captions = list(load_caption_pool()["test"].values())
    assert all(read_attribute_list(attribute_list(c)) == caption_labels(c) for c in captions)
    assert attribute_list(captions[0]).startswith("gender ") and "." not in attribute_list(captions[0])[:-1]


def test_unlabeled_pool_avoids_the_dataset_and_the_pretraining_images_and_reruns_nothing(make_config, tmp_path):
    from pipeline.core.config import load_config
    from pipeline.demo.raw import ensure_raw_data, ensure_unlabeled_pool
    from pipeline.demo.synthetic import dataset_names
    from pipeline.workflows import depends

    sets = {"pretraining": {"images": 30, "root": str(tmp_path / "pre")},
            "unlabeled_pool": {"images": 40, "root": str(tmp_path / "pool")}}
    cfg = load_config(make_config(data={"synthetic": {"num_images": 40, "image_size": 32}, **sets}))
    ensure_raw_data(cfg)
    ensure_unlabeled_pool(cfg)
    pool, pre, data = (dataset_names(root) for root in (tmp_path / "pool", tmp_path / "pre", cfg.data.root))
    assert len(pool) == 40 and len(pre) == 30 and not pool & (pre | data)
    images = (tmp_path / "pool" / "images").iterdir()
    assert sorted(p.name for p in images if not p.name.startswith(".")) == sorted(pool)  # hidden: the ownership marker
    # the prepared data does not depend on the pool: turning it on or off reruns nothing
    without = load_config(make_config(data={"synthetic": {"num_images": 40, "image_size": 32},
                                            "pretraining": sets["pretraining"], "unlabeled_pool": None}))
    assert depends.prepare(cfg) == depends.prepare(without)
    real = load_config(make_config(data={"synthetic": None, "unlabeled_pool": sets["unlabeled_pool"]}))
    with pytest.raises(ConfigError, match="^data.unlabeled_pool renders images: it needs data.synthetic$"):
        ensure_unlabeled_pool(real)  # a real dataset has no captions to render a pool from


def test_a_new_renderer_renders_the_images_again(tmp_path, monkeypatch):
    from pipeline.demo import synthetic

    root, cfg = tmp_path / "held-out", SyntheticData(image_size=32)
    generate_held_out(root, "pretraining", 6, cfg, seed=0, exclude=set(), workers=1)
    stamp = (root / "captions.json").stat().st_mtime_ns
    monkeypatch.setattr(synthetic, "RENDERER_VERSION", synthetic.RENDERER_VERSION + 1)
    generate_held_out(root, "pretraining", 6, cfg, seed=0, exclude=set(), workers=1)
    assert (root / "captions.json").stat().st_mtime_ns != stamp
    assert json.loads((root / "README.json").read_text())["renderer"] == synthetic.RENDERER_VERSION
    assert synthetic.dataset_settings(cfg, 0)["renderer"] == synthetic.RENDERER_VERSION  # DeepFashion-lite's too
