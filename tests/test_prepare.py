import errno
import json
import os
import socket
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import load_config
from pipeline.core.rundir import lock_file, output_lock, read_manifest
from pipeline.data.deepfashion import DataError, item_group
from pipeline.data.formats import INSTRUCTION, load_captions, split_rows
from pipeline.demo.synthetic import load_caption_pool
from stages import prepare
from stages.cli import stage_main
from tests.helpers import ROOT, run_stage


def _run(cfg_path, *overrides, force=False):
    return prepare.run(load_config(cfg_path, list(overrides)), Namespace(force=force))


def _placeholder(path: Path, colour=(120, 80, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format="JPEG")


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
    seen = list(ds["train"]["image_path"]) + list(ds["val"]["image_path"])
    assert not test_items & {item_group(Path(p).name) for p in seen}

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
        '"long.jpg": "' + "word " * 1001 + '"',
    ])
    (root / "captions.json").write_text("{\n" + body + "\n}\n")
    return {"missing.jpg": "missing image", "corrupt.jpg": "unreadable image", "truncated.jpg": "unreadable image",
            "empty.jpg": "empty caption", "number.jpg": "not a string", "dup.jpg": "duplicate image id",
            "long.jpg": "caption of 1001 words (at most 1000)"}


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


@pytest.mark.parametrize("content, reason", [
    (b'{"a.jpg": oops}', "malformed JSON at line 1 column 11: Expecting value"),
    (b'[{"a.jpg": "A tee."}]', "expected a JSON object mapping image file name -> caption"),
    ('{"a.jpg": "Une robe d\u2019\u00e9t\u00e9."}'.encode("latin-1", "replace"), "not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "nested 100000 levels deep at column 100000, deeper than Python's"),
    (b'{"a.jpg":\n 1' + b"7" * 4999 + b"}", "a number of 5000 digits at line 2 column 2, more than Python reads"),
])
def test_a_malformed_captions_file_is_one_line_before_anything_is_rendered(tmp_path, make_config, capsys, content,
                                                                          reason):
    """The demo config renders its pretraining images first, avoiding the dataset's captions: their file is read
    by the one validating reader, so a bad one is prepare's one line, not a traceback, and nothing is rendered."""
    raw = tmp_path / "mine"
    _placeholder(raw / "images" / "a.jpg")
    (raw / "captions.json").write_bytes(content)
    cfg_path = make_config(data={"root": str(raw), "pretraining": {"images": 4, "root": str(tmp_path / "pre")}})
    assert stage_main("prepare", prepare.run, argv=["--config", str(cfg_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        f"prepare: error: {raw / 'captions.json'}: {reason}"), err[-2000:]
    assert not (tmp_path / "pre").exists() and not (tmp_path / "run" / "data").exists()


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


def test_prepare_refuses_a_users_data_in_its_output_folder(tmp_path, make_config):
    cfg = load_config(make_config())
    raw = cfg.run_dir / "data" / "raw"  # the user's own dataset where prepare writes
    _placeholder(raw / "images" / "a.jpg")
    (raw / "captions.json").write_text('{"a.jpg": "A caption."}')
    res = run_stage("prepare", "--config", str(make_config()))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"prepare: error: {cfg.run_dir / 'data'} exists and was not written by fashion-distill "
        "(no .fashion-distill.json); refusing to replace it: move it away or choose another run_dir"]
    assert (raw / "captions.json").read_text() == '{"a.jpg": "A caption."}' and (raw / "images" / "a.jpg").is_file()
    assert not cfg.data.root.exists()  # refused before anything was generated


def _symlinked_dataset(tmp_path: Path) -> Path:
    """A DVC / git-annex style dataset: images/ holds relative symlinks into a cache outside images/, and the
    dataset folder itself is reached through a symlink."""
    pool = load_caption_pool()["train"]
    store = tmp_path / "store"
    captions = dict(sorted(pool.items())[:12])
    for i, name in enumerate(captions):
        blob = store / ".dvc" / "cache" / f"{i:02d}" / "0123456789abcdef"
        _placeholder(blob, (10 * i, 80, 40))
        (store / "images").mkdir(exist_ok=True)
        (store / "images" / name).symlink_to(Path("..") / blob.relative_to(store))
    (store / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "dataset").symlink_to(store)
    return tmp_path / "dataset"


def test_images_behind_symlinks_keep_the_names_the_dataset_gives_them(tmp_path, make_config):
    root = _symlinked_dataset(tmp_path)
    out = _run(make_config(data={"root": str(root)}))
    images = Path(os.path.abspath(root / "images"))
    ds = load_captions(out / "captions")
    paths = [r["image_path"] for s in ("train", "val", "test") for r in split_rows(ds, s)]
    assert len(paths) == 12 and all(Path(p).parent == images and Path(p).is_symlink() for p in paths)
    llava = json.loads((out / "llava_train.json").read_text())
    assert {x["image"] for x in llava} == {Path(r["image_path"]).name for r in split_rows(ds, "train")}
    karpathy = json.loads((out / "karpathy.json").read_text())
    assert {x["filepath"] for x in karpathy["images"]} == {str(images)}
    assert read_manifest(out)["figures"]["image_folder"] == str(images)


def test_an_existing_dataset_is_read_even_with_synthetic_settings(tmp_path, make_config):
    raw = tmp_path / "mine"
    _placeholder(raw / "images" / "WOMEN-Tees-id_00000001-01_1_front.jpg")
    _placeholder(raw / "images" / "WOMEN-Tees-id_00000002-01_1_front.jpg")
    (raw / "captions.json").write_text(json.dumps({"WOMEN-Tees-id_00000001-01_1_front.jpg": "A tee.",
                                                   "WOMEN-Tees-id_00000002-01_1_front.jpg": "Another tee."}))
    cfg_path = make_config(data={"root": str(raw)})  # data.synthetic stays set, as in the demo config
    assert load_config(cfg_path).data.synthetic is not None
    out = _run(cfg_path)
    assert json.loads((out / "stats.json").read_text())["total"] == 2
    assert sorted(p.name for p in raw.iterdir()) == ["captions.json", "images"]  # nothing generated into it


def test_synthetic_data_is_regenerated_only_in_a_folder_it_generated(make_config):
    cfg_path = make_config(data={"synthetic": {"num_images": 30}})
    root = load_config(cfg_path).data.root

    def total(*overrides):
        return json.loads((_run(cfg_path, *overrides) / "stats.json").read_text())["total"]

    assert total() == 30
    assert total("data.synthetic.num_images=20") == 20  # its own folder: regenerated with the new settings
    (root / "my-notes.txt").write_text("mine")  # now the folder holds something of the user's
    assert total("data.synthetic.num_images=25") == 20  # read as it is, not replaced
    assert (root / "my-notes.txt").read_text() == "mine"


def test_outputs_do_not_depend_on_student_settings(make_config):
    """stats.json lists the vocabulary for every minimum word count, so a student setting such as
    students.min_word_count neither reruns prepare nor, through its fingerprint, the teacher downstream."""
    cfg_path = make_config()
    out = _run(cfg_path, "students.min_word_count=2")
    manifest = (out / "manifest.json").read_bytes()
    vocabulary = json.loads((out / "stats.json").read_text())["vocabulary"]
    counts = [vocabulary["train_words_by_min_count"][str(k)] for k in range(1, 11)]
    assert counts[0] == vocabulary["train_words"] and counts == sorted(counts, reverse=True) and counts[1] < counts[0]
    _run(cfg_path, "students.min_word_count=3")
    assert (out / "manifest.json").read_bytes() == manifest  # up to date: skipped


def test_a_second_prepare_names_the_holder_or_waits(make_config):
    cfg_path = make_config()
    data = load_config(cfg_path).run_dir / "data"
    with output_lock(data):
        res = run_stage("prepare", "--config", str(cfg_path))
        assert res.returncode == 1
        assert res.stderr.strip().splitlines() == [
            f"prepare: error: {data} is in use by process {os.getpid()} on {socket.gethostname()} (lock "
            f"{lock_file(data)}); wait for it to finish or rerun with --wait"]
        waiter = subprocess.Popen([sys.executable, "-m", "stages.prepare", "--config", str(cfg_path), "--wait"],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in waiter.stderr:  # it logs that it waits, then blocks
            if f"waiting for {data}, in use by process {os.getpid()}" in line:
                break
        assert waiter.poll() is None and read_manifest(data) is None
    _, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err[-2000:]
    assert read_manifest(data)["figures"]["counts"]["test"] > 0


def test_two_concurrent_prepares_give_one_result_and_no_traceback(make_config):
    cfg_path = make_config()
    procs = [subprocess.Popen([sys.executable, "-m", "stages.prepare", "--config", str(cfg_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert "Traceback" not in "".join(err for _, err in results)
    assert sorted(rc for rc, _ in results) in ([0, 0], [0, 1])  # one ran; the other refused or found it done
    for rc, err in results:
        if rc:
            assert err.strip().splitlines()[-1].startswith("prepare: error: ") and " is in use by process " in err
    run_dir = load_config(cfg_path).run_dir
    assert read_manifest(run_dir / "data")["figures"]["counts"]["train"] > 0
    assert load_captions(run_dir / "data" / "captions")["train"].num_rows > 0
    assert not list(run_dir.glob(".data.tmp-*")) and not list(run_dir.parent.glob(".raw.tmp-*"))


def _read_only(folder: Path):
    """Make ``folder`` read-only for this process: chmod for a normal user, a read-only bind mount for root."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if bind.returncode:
        pytest.skip("running as root and cannot bind-mount: a read-only folder cannot be made")
    subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
    return lambda: subprocess.run(["umount", str(folder)], check=True)


def test_read_only_run_dir_is_one_line_and_keeps_outputs(make_config):
    cfg_path = make_config()
    out = _run(cfg_path)
    before = (out / "manifest.json").read_bytes()
    undo = _read_only(out.parent)
    try:
        res = run_stage("prepare", "--config", str(cfg_path), "--force")
    finally:
        undo()
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr[-2000:]
    assert lines[0].startswith(f"prepare: error: {out.parent}/") and lines[0].endswith(
        ("Read-only file system", "Permission denied"))
    assert (out / "manifest.json").read_bytes() == before


def test_full_disk_is_one_line_naming_the_file_and_keeps_outputs(make_config, monkeypatch, capsys):
    cfg_path = make_config()
    out = _run(cfg_path)
    before = (out / "manifest.json").read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    assert stage_main("prepare", prepare.run, argv=["--config", str(cfg_path), "--force"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"prepare: error: {out.parent}/.data.tmp-")
    assert lines[-1].endswith(": No space left on device")
    assert (out / "manifest.json").read_bytes() == before and not list(out.parent.glob(".data.tmp-*"))


def test_too_many_synthetic_images_is_one_line_and_keeps_outputs(tmp_path, make_config):
    cfg_path = make_config()
    out = _run(cfg_path)
    before = (out / "manifest.json").read_bytes()
    res = run_stage("prepare", "--config", str(cfg_path), f"data.root={tmp_path / 'new-raw'}",
                    "data.synthetic.num_images=999999")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare: error: data.synthetic.num_images: 999999 exceeds the ")
    assert (out / "manifest.json").read_bytes() == before and not (tmp_path / "new-raw").exists()


def _truncated_jpeg_dataset(root: Path) -> str:
    """Thirty noisy JPEGs, one cut short after its header; returns the cut one's name."""
    rng = np.random.default_rng(0)
    captions = dict(sorted(load_caption_pool()["train"].items())[:30])
    (root / "images").mkdir(parents=True)
    for name in captions:
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / name, quality=90)
    cut = sorted(captions)[0]
    data = (root / "images" / cut).read_bytes()
    (root / "images" / cut).write_bytes(data[: len(data) * 2 // 3])
    (root / "captions.json").write_text(json.dumps(captions))
    return cut


def test_header_check_lets_a_truncated_image_through_and_its_reader_names_it(tmp_path, make_config):
    from pipeline.data.images import ImageError, load_rgb

    cut = _truncated_jpeg_dataset(tmp_path / "raw-cut")
    decoded = _run(make_config(data={"root": str(tmp_path / "raw-cut"), "check_images": "decode"}))
    assert [s["record"] for s in json.loads((decoded / "skipped.json").read_text())] == [cut]
    out = _run(make_config(data={"root": str(tmp_path / "raw-cut"), "check_images": "header"}), force=True)
    ds = load_captions(out / "captions")
    paths = [r["image_path"] for s in ("train", "val", "test") for r in split_rows(ds, s)]
    assert len(paths) == 30  # the header check does not decode
    with pytest.raises(ImageError, match=rf"^{tmp_path / 'raw-cut' / 'images' / cut}: unreadable image "
                                         r"\(OSError: image file is truncated"):
        [load_rgb(p) for p in paths]  # what every stage reads images with


@pytest.mark.slow
def test_students_stage_names_a_truncated_image(tmp_path, make_config):
    cut = _truncated_jpeg_dataset(tmp_path / "raw-cut")
    cfg_path = make_config(data={"root": str(tmp_path / "raw-cut"), "check_images": "header"},
                           students={"archs": ["vgg19_gru"], "epochs": 1,
                                     "encoder": {"width": 0.125, "image_size": 32}})
    out = _run(cfg_path)
    before = (out / "manifest.json").read_bytes()
    res = run_stage("students", "--config", str(cfg_path))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith(
        f"students: error: {tmp_path / 'raw-cut' / 'images' / cut}: unreadable image")
    assert (out / "manifest.json").read_bytes() == before


def test_fifos_and_link_loops_under_images_are_skipped_not_opened(tmp_path, make_config):
    """Opening a FIFO blocks forever: only regular files are opened, the rest skipped with a reason (the stage runs
    in a process with a time limit, so a hang fails the test)."""
    import os

    raw = tmp_path / "raw-fifo"
    good = {f"WOMEN-Tees-id_{i:08d}-01_1_front.jpg": f"The lady wears a ring number {i}." for i in range(6)}
    for name in good:
        _placeholder(raw / "images" / name)
    os.mkfifo(raw / "images" / "fifo.jpg")
    (raw / "images" / "loop.jpg").symlink_to(raw / "images" / "loop.jpg")
    (raw / "images" / "folder.jpg").mkdir()
    bad = {"fifo.jpg": "not a regular file (a FIFO)", "loop.jpg": "cannot be read (Too many levels of symbolic links)",
           "folder.jpg": "not a regular file (a folder)"}
    (raw / "captions.json").write_text(json.dumps({**good, **{k: "A caption." for k in bad}}))
    path = make_config(data={"root": str(raw), "synthetic": None})
    res = run_stage("prepare", "--config", str(path), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    skipped = json.loads((load_config(path).run_dir / "data" / "skipped.json").read_text())
    reasons = {s["record"]: s["reason"] for s in skipped}
    assert set(reasons) == set(bad) and all(reasons[k].startswith(bad[k] + ": ") for k in bad), reasons
