import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, run_stage
from pipeline.config import load_config
from pipeline.data.deepfashion import DataError, item_group
from pipeline.data.formats import INSTRUCTION, load_captions, split_rows
from pipeline.data.synthetic import load_caption_pool
from pipeline.rundir import read_manifest
from stages import prepare


def _run(cfg_path, *overrides, force=False):
    return prepare.run(load_config(cfg_path, list(overrides)), Namespace(force=force))


def _placeholder(path: Path, colour=(120, 80, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_prepare_on_deepfashion_lite(make_config):
    cfg_path = make_config()
    out = _run(cfg_path)
    ds = load_captions(out / "captions")
    counts = {s: len(ds[s]) for s in ("train", "val", "test")}
    assert sum(counts.values()) == 60 and all(counts.values())
    assert set(list(ds["train"]["source"])) == {"gt"}
    assert set(list(ds["val"]["split"])) == {"val"}
    assert all(Path(p).is_file() for p in list(ds["test"]["image_path"]))
    # no garment item on both sides of the train/test boundary
    test_items = {item_group(Path(p).name) for p in list(ds["test"]["image_path"])}
    assert not test_items & {item_group(Path(p).name) for p in list(ds["train"]["image_path"]) + list(ds["val"]["image_path"])}

    llava = json.loads((out / "llava_train.json").read_text())
    assert len(llava) == counts["train"]
    first = llava[0]
    assert first["conversations"][0] == {"from": "human", "value": f"<image>\n{INSTRUCTION}"}
    assert first["conversations"][1]["value"] == ds["train"][0]["caption"]
    assert (load_config(cfg_path).data.root / "images" / first["image"]).is_file()

    karpathy = json.loads((out / "karpathy.json").read_text())
    assert len(karpathy["images"]) == 60
    sent = karpathy["images"][0]["sentences"][0]
    assert sent["tokens"] and all(t == t.lower() and t.isascii() for t in sent["tokens"])

    stats = json.loads((out / "stats.json").read_text())
    assert stats["counts"] == counts and stats["skipped"] == 0
    assert 15 < stats["caption_length_words"]["mean"] < 90 and stats["vocabulary"]["train_words"] > 30
    assert read_manifest(out)["figures"]["counts"] == counts


def test_split_is_deterministic_per_seed(make_config):
    def splits(seed, name):
        out = _run(make_config(), f"seed={seed}", f"run_dir={Path(make_config()).parent / name}",
                   f"data.root={Path(make_config()).parent / 'raw'}")
        ds = load_captions(out / "captions")
        return {s: sorted(list(ds[s]["image_id"])) for s in ("train", "val", "test")}

    assert splits(0, "a") == splits(0, "b")


def test_course_split_files_keep_their_split(tmp_path, make_config):
    pool = load_caption_pool()
    raw = tmp_path / "course"
    chosen = {s: dict(sorted(pool[s].items())[:n]) for s, n in (("train", 150), ("test", 40))}
    for split, caps in chosen.items():
        (raw / f"{split}_captions.json").parent.mkdir(parents=True, exist_ok=True)
        (raw / f"{split}_captions.json").write_text(json.dumps(caps))
        for name in caps:
            _placeholder(raw / "images" / name)
    out = _run(make_config(data={"root": str(raw), "synthetic": None}))
    ds = load_captions(out / "captions")
    assert len(ds["test"]) == 40 and len(ds["train"]) + len(ds["val"]) == 150
    assert set(list(ds["test"]["image_id"])) == {Path(n).stem for n in chosen["test"]}
    assert json.loads((out / "stats.json").read_text())["layout"] == "split"


def _bad_raw(root: Path) -> dict[str, str]:
    """captions.json with one record of every bad kind; returns {record: expected reason fragment}."""
    good = {f"WOMEN-Tees-id_{i:08d}-01_1_front.jpg": f"The lady wears a ring number {i}." for i in range(6)}
    for name in good:
        _placeholder(root / "images" / name)
    (root / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "images" / "truncated.jpg").write_bytes((root / "images" / next(iter(good))).read_bytes()[:40])
    _placeholder(root / "images" / "empty.jpg")
    _placeholder(root / "images" / "number.jpg")
    _placeholder(root / "images" / "dup.jpg")
    body = ",\n".join([f'"{k}": "{v}"' for k, v in good.items()] + [
        '"missing.jpg": "A caption for an image that is not there."',
        '"corrupt.jpg": "A caption for a corrupt image."',
        '"truncated.jpg": "A caption for a truncated image."',
        '"empty.jpg": "   "',
        '"number.jpg": 42',
        '"dup.jpg": "first"',
        '"dup.jpg": "second"',
    ])
    (root / "captions.json").write_text("{\n" + body + "\n}\n")
    return {"missing.jpg": "missing image", "corrupt.jpg": "unreadable image", "truncated.jpg": "unreadable image",
            "empty.jpg": "empty caption", "number.jpg": "not a string", "dup.jpg": "duplicate image id"}


def test_bad_records_are_skipped_and_reported(tmp_path, make_config):
    expected = _bad_raw(tmp_path / "bad")
    out = _run(make_config(data={"root": str(tmp_path / "bad"), "synthetic": None}))
    skipped = json.loads((out / "skipped.json").read_text())
    reasons = {s["record"]: s["reason"] for s in skipped}
    assert set(reasons) == set(expected)
    for record, fragment in expected.items():
        assert fragment in reasons[record], (record, reasons[record])
    ds = load_captions(out / "captions")
    captions = [r["caption"] for s in ("train", "val", "test") for r in split_rows(ds, s)]
    assert len(captions) == 6 + 1  # the six good ones + the first of the duplicated pair
    assert "first" in captions


def test_fail_policy_names_first_bad_record(tmp_path, make_config):
    _bad_raw(tmp_path / "bad")
    with pytest.raises(DataError, match=r"captions.json: record 'empty.jpg': empty caption"):
        _run(make_config(data={"root": str(tmp_path / "bad"), "synthetic": None, "on_bad_record": "fail"}))


def test_malformed_json_names_file_and_line(tmp_path, make_config):
    (tmp_path / "raw2").mkdir()
    (tmp_path / "raw2" / "captions.json").write_text('{\n"a.jpg": "ok",\n"b.jpg": oops\n}')
    with pytest.raises(DataError, match=r"raw2/captions.json: malformed JSON at line 3"):
        _run(make_config(data={"root": str(tmp_path / "raw2"), "synthetic": None}))


def test_duplicate_across_train_and_test_files(tmp_path, make_config):
    raw = tmp_path / "dups"
    _placeholder(raw / "images" / "x.jpg")
    _placeholder(raw / "images" / "y.jpg")
    (raw / "train_captions.json").write_text(json.dumps({"x.jpg": "a caption.", "y.jpg": "b caption."}))
    (raw / "test_captions.json").write_text(json.dumps({"x.jpg": "same image again."}))
    out = _run(make_config(data={"root": str(raw), "synthetic": None}))
    skipped = json.loads((out / "skipped.json").read_text())
    assert skipped == [{"file": "test_captions.json", "record": "x.jpg",
                        "reason": "duplicate image id 'x' (first seen in train_captions.json)"}]


def test_rerun_is_skipped_unless_forced_or_changed(make_config):
    cfg_path = make_config()
    out = _run(cfg_path)
    first = read_manifest(out)["finished_at"], (out / "manifest.json").stat().st_mtime_ns
    _run(cfg_path)
    assert (out / "manifest.json").stat().st_mtime_ns == first[1]
    _run(cfg_path, force=True)
    assert (out / "manifest.json").stat().st_mtime_ns != first[1]
    before = (out / "manifest.json").stat().st_mtime_ns
    _run(cfg_path, "data.split.val=0.3")  # config change -> rerun
    assert (out / "manifest.json").stat().st_mtime_ns != before


KILLER = """
import os, signal, sys
from pipeline.data import formats
real = formats.karpathy_json
def killed(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
formats.karpathy_json = killed
import stages.prepare as p
p.karpathy_json = killed
from stages.cli import stage_main
sys.exit(stage_main("prepare", p.run, argv=sys.argv[1:]))
"""


def test_killed_prepare_leaves_no_readable_output_and_rerun_completes(make_config):
    cfg_path = make_config()
    cfg = load_config(cfg_path)
    proc = subprocess.run([sys.executable, "-c", KILLER, "--config", str(cfg_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    data_dir = cfg.run_dir / "data"
    assert not data_dir.exists() and read_manifest(data_dir) is None
    leftovers = list(cfg.run_dir.glob(".data.tmp-*"))
    assert leftovers, "the kill should have happened while the temp folder was being filled"
    res = run_stage("prepare", "--config", str(cfg_path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert read_manifest(data_dir)["figures"]["counts"]["test"] > 0
    assert not list(cfg.run_dir.glob(".data.tmp-*"))


def test_cli_bad_key_exits_nonzero_with_one_line(make_config):
    res = run_stage("prepare", "--config", str(make_config()), "data.nope=1")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.nope: unknown key" in lines[0]
