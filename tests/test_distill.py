import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from pipeline.core.config import load_config
from pipeline.core.rundir import ForeignDataError, OutputInUseError, StageInputError, read_manifest
from pipeline.data.formats import load_captions, split_rows
from pipeline.evaluation.metrics import CaptionScorer
from pipeline.reporting.cards import front_matter
from pipeline.teacher.distill import parse_shard, read_generations
from pipeline.workflows.distill import distill_dataset
from stages import caption, finetune
from tests.helpers import ROOT, kill_stage_when, run_stage

FAST_TEACHER = {"train": {"epochs": 1, "eval_generation_samples": 0}}


@pytest.fixture(scope="module")
def trained(teacher_world):
    """A run with a (briefly) fine-tuned teacher; returns its config path."""
    path = teacher_world("distill", teacher=FAST_TEACHER, distill={"max_new_tokens": 24})
    finetune.run(load_config(path), Namespace(force=False))
    return path


def _dataset(cfg, name):
    ds = load_captions(cfg.run_dir / "distill" / name / "captions")
    return {s: {r["image_id"]: r["caption"] for r in split_rows(ds, s)} for s in ("train", "val", "test")}


def _distill(path, *overrides, force=True, shard=None, merge=False):
    cfg = load_config(path, list(overrides))
    distill_dataset(cfg, shard=parse_shard(shard), merge=merge, force=force)
    return cfg


def test_same_seed_same_captions_across_batch_sizes_and_shards(trained):
    cfg1 = _distill(trained, "distill.temperature=0.9", "distill.name=b1", "distill.batch_size=1")
    cfg8 = _distill(trained, "distill.temperature=0.9", "distill.name=b8", "distill.batch_size=8")
    one, eight = _dataset(cfg1, "b1"), _dataset(cfg8, "b8")
    assert one == eight
    for i in range(2):
        _distill(trained, "distill.temperature=0.9", "distill.name=sh", "distill.batch_size=3", force=False,
                 shard=f"{i}/2")
    sharded = _distill(trained, "distill.temperature=0.9", "distill.name=sh", force=False, merge=True)
    assert _dataset(sharded, "sh") == one
    # shards are disjoint and cover everything
    out = sharded.run_dir / "distill" / "sh"
    a, b = (read_generations(out / f"generations.shard-{i}-of-2.jsonl") for i in range(2))
    assert not set(a) & set(b) and len(a) + len(b) == len(one["train"]) + len(one["val"]) + len(one["test"]) + len(
        json.loads((out / "rejected.json").read_text()))
    # another seed gives other captions; the test split is the ground truth, unchanged
    other = _distill(trained, "distill.temperature=0.9", "distill.name=s2", "seed=5")
    assert _dataset(other, "s2")["train"] != one["train"]
    gt = load_captions(cfg1.run_dir / "data" / "captions")
    assert one["test"] == {r["image_id"]: r["caption"] for r in split_rows(gt, "test")}


def test_outputs_meta_and_diagnostics(trained):
    cfg = _distill(trained, "distill.temperature=0.2", "distill.name=precise")
    out = cfg.run_dir / "distill" / "precise"
    ds = load_captions(out / "captions")
    assert set(split_rows(ds, "train")[0]) == {"image_id", "image_path", "caption", "split", "source", "sample",
                                               "origin"}
    assert {(r["sample"], r["origin"]) for s in ("train", "val", "test") for r in split_rows(ds, s)} == {
        (0, "dataset")}
    assert {r["source"] for r in split_rows(ds, "train")} == {"precise"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["temperature"] == 0.2 and meta["seed"] == cfg.seed and meta["teacher_fingerprint"]
    assert "deepfashion dataset style" in meta["prompt"]
    diag = json.loads((out / "diagnostics.json").read_text())
    for key in ("length_mean", "length_p50", "length_p95", "vocabulary", "distinct_1", "distinct_2",
                "share_empty", "share_truncated"):
        assert key in diag
    # the agreement figures are the teacher's train+val captions scored against the ground truth of those images
    gt = load_captions(cfg.run_dir / "data" / "captions")
    rows = split_rows(gt, "train") + split_rows(gt, "val")
    generations = read_generations(out / "generations.jsonl")
    with CaptionScorer(meteor=False) as scorer:
        agree = scorer.score({r["image_id"]: [r["caption"]] for r in rows},
                             {r["image_id"]: generations[r["image_id"], 0]["caption"] for r in rows})
    assert {k: diag["vs_ground_truth"][k] for k in ("BLEU-4", "CIDEr-D")} == pytest.approx(
        {k: agree[k] for k in ("BLEU-4", "CIDEr-D")})
    from pipeline.evaluation.attributes import attribute_accuracy, majority_baseline

    references = {r["image_id"]: r["caption"] for r in rows}
    assert diag["vs_ground_truth"]["attributes"] == attribute_accuracy(
        references, {k: generations[k, 0]["caption"] for k in references})
    test = split_rows(gt, "test")
    assert diag["majority_attributes"] == majority_baseline([r["caption"] for r in split_rows(gt, "train")],
                                                            {r["image_id"]: r["caption"] for r in test})
    assert diag["teacher_on_test"]["attributes"]["images"] == len(test)
    # max_new_tokens=24 cuts most captions: they are listed, not kept
    rejected = json.loads((out / "rejected.json").read_text())
    truncated = [r for r in rejected if "truncated" in r["reason"]]
    assert truncated and all(r["reason"] == "empty" for r in rejected if r not in truncated)
    assert diag["share_truncated"] == pytest.approx(len(truncated) / (diag["captions"] + len(rejected)))
    kept_ids = {r["image_id"] for r in split_rows(ds, "train") + split_rows(ds, "val")}
    assert not kept_ids & {r["image_id"] for r in rejected}
    card = front_matter((out / "README.md").read_text())  # the dataset card
    assert card["task_categories"] == ["image-to-text"] and card["temperature"] == 0.2 and card["top_p"] == 1.0
    assert card["seed"] == cfg.seed and card["prompt"] == meta["prompt"]
    assert card["teacher"] == str(cfg.teacher.model) and card["adapter"] == str(cfg.run_dir / "teacher" / "adapter")
    assert card["counts"] == {"train": len(split_rows(ds, "train")), "val": len(split_rows(ds, "val")),
                              "test": len(split_rows(ds, "test")), "rejected": len(rejected)}
    assert card["diagnostics"]["distinct_2"] == diag["distinct_2"]


def test_caption_with_the_fine_tuned_teacher(trained, tmp_path):
    cfg = load_config(trained)
    images = [r["image_path"] for r in split_rows(load_captions(cfg.run_dir / "data" / "captions"), "test")[:3]]
    out = tmp_path / "teacher.jsonl"
    caption.run(cfg, Namespace(student="teacher", images=images, out=str(out), beam=None, runtime="torch"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == images and any(r["caption"] for r in rows)
    res = run_stage("caption", "--config", str(trained), "--student", "teacher", "--images", *images,
                    "--runtime", "onnx")
    assert res.returncode == 1 and res.stderr.strip().endswith("--runtime onnx: the teacher runs in PyTorch only")


def test_kill_9_then_rerun_gives_identical_dataset(trained):
    reference = _dataset(_distill(trained, "distill.temperature=0.9", "distill.name=ref", "distill.batch_size=2"),
                         "ref")
    cfg = load_config(trained, ["distill.temperature=0.9", "distill.name=killed", "distill.batch_size=2"])
    jsonl = cfg.run_dir / "distill" / "killed" / "generations.jsonl"
    kill_stage_when(["stages.distill", "--config", str(trained), "distill.temperature=0.9", "distill.name=killed",
                     "distill.batch_size=2"], lambda: len(read_generations(jsonl)) >= 10)
    partial = len(read_generations(jsonl))
    assert 10 <= partial < sum(len(v) for v in reference.values())
    assert read_manifest(jsonl.parent) is None
    with open(jsonl, "a") as fh:
        fh.write('{"image_id": "torn')  # a write cut short by the kill
    mine = jsonl.parent / "notes.txt"  # a user's file in the half-written folder: no rerun may delete it
    mine.write_text("mine")
    for overrides, force in ((["distill.temperature=0.5"], False), ([], True)):
        with pytest.raises(ForeignDataError, match=f"^{mine} was not written by fashion-distill"):
            _distill(trained, "distill.temperature=0.9", "distill.name=killed", "distill.batch_size=2", *overrides,
                     force=force)
        assert mine.read_text() == "mine" and len(read_generations(jsonl)) == partial
    mine.unlink()
    _distill(trained, "distill.temperature=0.9", "distill.name=killed", "distill.batch_size=2", force=False)
    assert _dataset(cfg, "killed") == reference
    lines = jsonl.read_text().splitlines()
    assert len(lines) == len({json.loads(x)["image_id"] for x in lines})  # exactly one caption per image


def test_missing_teacher_or_adapter_is_a_clear_error(teacher_world, trained, tmp_path):
    fresh = teacher_world("no-finetune")
    res = run_stage("distill", "--config", str(fresh))
    assert res.returncode == 1 and "run the 'finetune' stage first" in res.stderr.strip().splitlines()[-1]
    res = run_stage("distill", "--config", str(trained), f"teacher.model={tmp_path / 'gone'}", "--force")
    assert res.returncode == 1 and "does not exist" in res.stderr.strip().splitlines()[-1]
    adapter = load_config(trained).run_dir / "teacher" / "adapter"
    (adapter / "adapter_config.json").rename(adapter / "moved.json")
    try:
        res = run_stage("distill", "--config", str(trained), "--force")
        assert res.returncode == 1 and "LoRA adapter" in res.stderr.strip().splitlines()[-1]
    finally:
        (adapter / "moved.json").rename(adapter / "adapter_config.json")


SHARD_HOLDER = """
import sys, time
from pipeline.core.rundir import output_lock
with output_lock(sys.argv[1], part=sys.argv[2]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_each_shard_has_its_own_lock(make_config):
    cfg = load_config(make_config())
    out = cfg.run_dir / "distill" / cfg.distill.dataset_name
    holder = subprocess.Popen([sys.executable, "-c", SHARD_HOLDER, str(out), "shard-0-of-2"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputInUseError, match=rf"^{out} \(shard-0-of-2\) is in use by process {holder.pid} "):
            distill_dataset(cfg, shard=(0, 2))
        for shard, merge in (((1, 2), False), ((0, 2), True), ((0, 1), False)):  # another shard, merge, unsharded
            with pytest.raises(StageInputError, match="run the 'prepare' stage first"):  # past the lock
                distill_dataset(cfg, shard=shard, merge=merge)
    finally:
        holder.kill()
        holder.wait()


# --- several captions per image and unlabelled images (issue 15) ---

K2 = ("distill.temperature=0.9", "distill.samples_per_image=2")


def _noise_image(path, seed):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)


def _generations(out):
    """Every (image id, sample) -> record of the generation files in ``out``, and the number of lines."""
    records, lines = {}, 0
    for file in sorted(out.glob("generations*.jsonl")):
        records.update(read_generations(file))
        lines += len(file.read_text().splitlines())
    return records, lines


@pytest.fixture(scope="module")
def photos(trained, tmp_path_factory):
    """An unlabelled folder: two new photos, a copy of a train image, a broken file, a text file, a hidden file."""
    import shutil

    cfg = load_config(trained)
    train = split_rows(load_captions(cfg.run_dir / "data" / "captions"), "train")
    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    _noise_image(folder / "new.png", 1)
    _noise_image(folder / "sub" / "other.jpg", 2)
    shutil.copy(train[0]["image_path"], folder / "copy-of-train.jpg")
    shutil.copy(train[1]["image_path"], folder / ".hidden.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "notes.txt").write_text("no image here")
    return folder


@pytest.fixture(scope="module")
def mixed(trained, photos):
    """k=2 samples per image plus the unlabelled photos, distilled in one go (batch size 8)."""
    return _distill(trained, *K2, "distill.name=mixed", f"distill.unlabeled={photos}")


class _Crash(Exception):
    pass


def test_k_samples_do_not_depend_on_batch_size_shards_or_a_crash(trained, photos, mixed, monkeypatch):
    from pipeline.teacher import engines
    from pipeline.teacher.generate import image_seed, sample_seed

    assert sample_seed(7, "x", 0) == image_seed(7, "x") != sample_seed(7, "x", 1)  # k=1 datasets keep their seeds
    reference, _ = _generations(mixed.run_dir / "distill" / "mixed")
    args = (*K2, "distill.name=crashed", f"distill.unlabeled={photos}", "distill.batch_size=5")
    _distill(trained, *args, force=False, shard="0/2")
    real, calls = engines.HfEngine.generate, []

    def crashing(*a, **k):  # the process dies in its 6th batch, after 5 batches were written
        calls.append(1)
        if len(calls) == 6:
            raise _Crash
        return real(*a, **k)

    monkeypatch.setattr(engines.HfEngine, "generate", crashing)
    with pytest.raises(_Crash):
        _distill(trained, *args, force=False, shard="1/2")
    monkeypatch.undo()
    shard1 = load_config(trained, list(args)).run_dir / "distill" / "crashed" / "generations.shard-1-of-2.jsonl"
    assert sum("caption" in r for r in read_generations(shard1).values()) == 25  # 5 batches of 5
    with open(shard1, "a") as fh:
        fh.write('{"image_id": "torn')  # a write cut short by the kill
    _distill(trained, *args, force=False, shard="1/2")  # resumes
    merged = _distill(trained, *args, force=False, merge=True)
    out = merged.run_dir / "distill" / "crashed"
    again, n_lines = _generations(out)
    assert again == reference and n_lines == len(reference)  # same samples, each written once
    gt = load_captions(merged.run_dir / "data" / "captions")
    labelled = split_rows(gt, "train") + split_rows(gt, "val")
    assert {j for (i, j) in reference if i.startswith("unlabeled/")} == {0, 1}
    assert {k for k in reference if k[0] in {r["image_id"] for r in labelled}} == {
        (r["image_id"], j) for r in labelled for j in (0, 1)}
    test_ids = {r["image_id"] for r in split_rows(gt, "test")}
    assert {k for k in reference if k[0] in test_ids} == {(i, 0) for i in test_ids}  # the test images: once
    assert _dataset(merged, "crashed") == _dataset(mixed, "mixed")
    differ = [i for i in {r["image_id"] for r in labelled} if reference[i, 0]["caption"] != reference[i, 1]["caption"]]
    assert len(differ) > len(labelled) / 2  # two samples, not one caption twice


def test_unlabeled_images_are_captioned_marked_and_bad_files_reported(mixed, photos):
    out = mixed.run_dir / "distill" / "mixed"
    ds = load_captions(out / "captions")
    generations, _ = _generations(out)
    rejected = json.loads((out / "rejected.json").read_text())
    train = split_rows(ds, "train")
    new = {"unlabeled/new.png", "unlabeled/sub/other.jpg"}
    kept = {(r["image_id"], r["sample"]) for r in train if r["origin"] == "unlabeled"}
    dropped = {(r["image_id"], r["sample"]) for r in rejected if "sample" in r and r["image_id"] in new}
    assert kept | dropped == {(i, j) for i in new for j in (0, 1)} and not kept & dropped
    assert all(r["split"] == "train" and r["caption"] == generations[r["image_id"], r["sample"]]["caption"]
               and r["image_path"] == str(photos / r["image_id"].removeprefix("unlabeled/"))
               for r in train if r["origin"] == "unlabeled")
    assert not any(r["origin"] == "unlabeled" for s in ("val", "test") for r in split_rows(ds, s))
    skipped = {r["image_id"]: r["reason"] for r in rejected if "path" in r}
    assert set(skipped) == {"unlabeled/copy-of-train.jpg", "unlabeled/broken.jpg", "unlabeled/notes.txt"}
    assert skipped["unlabeled/copy-of-train.jpg"].startswith("train image ")
    assert skipped["unlabeled/broken.jpg"].startswith("unreadable image")
    assert skipped["unlabeled/notes.txt"].startswith("unreadable image")
    diag = json.loads((out / "diagnostics.json").read_text())
    assert diag["samples_per_image"] == 2
    assert diag["unlabeled"] == {"folder": str(photos), "images": 5, "captioned": 2, "skipped": 3,
                                 "captions": len(kept)}
    card = front_matter((out / "README.md").read_text())
    assert card["samples_per_image"] == 2 and card["unlabeled"] == diag["unlabeled"]
    assert json.loads((out / "meta.json").read_text())["unlabeled"] == str(photos)


def test_unlabeled_test_images_are_refused_before_any_caption(trained, tmp_path):
    from pipeline.core.errors import PipelineError

    cfg = load_config(trained)
    test = split_rows(load_captions(cfg.run_dir / "data" / "captions"), "test")
    folder = tmp_path / "photos"
    folder.mkdir()
    _noise_image(folder / "fine.png", 3)
    copy = folder / "exam.jpg"
    copy.write_bytes(Path(test[0]["image_path"]).read_bytes())
    args = ("distill.name=refused", f"distill.unlabeled={folder}")
    with pytest.raises(PipelineError, match=rf"^{copy}: is test image '{test[0]['image_id']}' \(same bytes"):
        _distill(trained, *args)
    copy.unlink()
    (folder / "link.jpg").symlink_to(test[1]["image_path"])
    with pytest.raises(PipelineError, match=rf"^{folder / 'link.jpg'}: is test image '{test[1]['image_id']}' "
                                            r"\(same file\)"):
        _distill(trained, *args)
    assert _generations(cfg.run_dir / "distill" / "refused") == ({}, 0)  # nothing captioned


def test_the_unlabeled_pool_is_rendered_on_first_use(trained, tmp_path):
    from pipeline.demo.synthetic import dataset_names

    pool = tmp_path / "pool"
    cfg = _distill(trained, "distill.name=pooled", f"data.unlabeled_pool={{images: 6, root: {pool}}}",
                   f"distill.unlabeled={pool / 'images'}")
    rendered = dataset_names(pool)
    assert len(rendered) == 6 and not rendered & dataset_names(cfg.data.root)
    diag = json.loads((cfg.run_dir / "distill" / "pooled" / "diagnostics.json").read_text())
    assert {k: diag["unlabeled"][k] for k in ("images", "captioned", "skipped")} == {"images": 6, "captioned": 6,
                                                                                      "skipped": 0}
