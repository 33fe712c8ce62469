"""`make publish`: a caption dataset of the run as a Hub-ready folder, read back offline with `datasets`."""

import time
from argparse import Namespace

import pytest

from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.rundir import ForeignDataError, RunDir, write_manifest
from pipeline.data.formats import DISTILL_COLUMNS, load_captions, split_rows, to_hf_dataset
from pipeline.reporting.cards import front_matter
from pipeline.workflows.publish import publish_dataset
from tests.helpers import run_stage, write_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A prepared DeepFashion-lite run with a hand-made distilled dataset `precise` (its own card)."""
    from stages import prepare

    path = write_config(tmp_path_factory.mktemp("publish"))
    cfg = load_config(path)
    prepare.run(cfg, Namespace(force=False))
    rd = RunDir(cfg.run_dir)
    rows = [r for split in ("train", "val", "test") for r in split_rows(load_captions(rd.data / "captions"), split)]
    distilled = [{**r, "caption": f"teacher: {r['caption']}", "source": "precise", "sample": 0, "origin": "dataset"}
                 for r in rows]
    to_hf_dataset(distilled, DISTILL_COLUMNS).save_to_disk(str(rd.distill("precise") / "captions"))
    (rd.distill("precise") / "README.md").write_text("---\npretty_name: fashion-distill precise captions\n"
                                                     "license: other\n---\n\n# `precise`\n\nThe teacher's captions.\n")
    write_manifest(rd.distill("precise"), stage="distill", config={}, inputs={}, started=time.time())
    return path, cfg, rows


def test_published_datasets_load_offline_with_hub_splits_and_decoded_images(run, tmp_path):
    from datasets import load_dataset

    _, cfg, rows = run
    rd = RunDir(cfg.run_dir)
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    for dataset, caption_prefix in (("data", ""), ("distill/precise", "teacher: ")):
        out = tmp_path / dataset.replace("/", "-")
        counts = publish_dataset(rd, dataset, out, cfg.data.root)
        assert counts == {"train": len(by_split["train"]), "validation": len(by_split["val"]),
                          "test": len(by_split["test"])}
        loaded = load_dataset(str(out))  # what the Hub's viewer and `load_dataset("<repo>")` do
        assert set(loaded) == {"train", "validation", "test"}
        for hub, split in (("train", "train"), ("validation", "val"), ("test", "test")):
            part, expected = loaded[hub], by_split[split]
            assert part.num_rows == len(expected)
            first = part[0]
            original = next(r for r in expected if r["image_id"] == first["image_id"])
            assert first["caption"] == caption_prefix + original["caption"]
            assert first["image"].size == (32, 32) and first["image"].mode == "RGB"  # decoded from the bytes inside
            assert "image_path" not in part.column_names and "split" not in part.column_names
        # nothing in the copy points back into this machine's folders
        for shard in (out / "data").glob("*.parquet"):
            assert str(cfg.data.root).encode() not in shard.read_bytes()
        card = front_matter((out / "README.md").read_text())
        assert card["license"] == "other"
        assert [f["split"] for f in card["configs"][0]["data_files"]] == ["train", "validation", "test"]
        assert "the run's `val` is `validation` here" in (out / "README.md").read_text()
    # the run's own copy is unchanged: split val, absolute paths
    assert set(load_captions(rd.data / "captions")) == {"train", "val", "test"}
    assert front_matter((tmp_path / "distill-precise" / "README.md").read_text())["pretty_name"] == (
        "fashion-distill precise captions")


def test_publish_refuses_what_it_must_not_touch(run, tmp_path):
    path, cfg, _ = run
    with pytest.raises(PipelineError, match="DATASET distill/nope: .* not a finished caption dataset"):
        publish_dataset(RunDir(cfg.run_dir), "distill/nope", tmp_path / "out", cfg.data.root)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(ForeignDataError):
        publish_dataset(RunDir(cfg.run_dir), "data", mine, cfg.data.root)
    assert (mine / "notes.txt").read_text() == "my notes"
    res = run_stage("publish", "--config", str(path), "--dataset", "data", "--out", str(tmp_path / "cli"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "published data ->" in res.stdout
    assert {"README.md", "data"} <= {p.name for p in (tmp_path / "cli").iterdir()}
