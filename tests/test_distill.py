import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace

import pytest
from conftest import ROOT, run_stage

from pipeline.cards import front_matter
from pipeline.config import load_config
from pipeline.data.formats import load_captions, split_rows
from pipeline.metrics import CaptionScorer
from pipeline.rundir import OutputInUseError, StageInputError, read_manifest
from pipeline.teacher.dataset import distill_dataset
from pipeline.teacher.distill import parse_shard, read_generations
from stages import caption, finetune

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
    assert set(split_rows(ds, "train")[0]) == {"image_id", "image_path", "caption", "split", "source"}
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
                             {r["image_id"]: generations[r["image_id"]]["caption"] for r in rows})
    assert {k: diag["vs_ground_truth"][k] for k in ("BLEU-4", "CIDEr-D")} == pytest.approx(
        {k: agree[k] for k in ("BLEU-4", "CIDEr-D")})
    from pipeline.attribute_metrics import attribute_accuracy, majority_baseline

    references = {r["image_id"]: r["caption"] for r in rows}
    assert diag["vs_ground_truth"]["attributes"] == attribute_accuracy(
        references, {k: generations[k]["caption"] for k in references})
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
    proc = subprocess.Popen([sys.executable, "-m", "stages.distill", "--config", str(trained),
                             "distill.temperature=0.9", "distill.name=killed", "distill.batch_size=2"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_generations(jsonl)) < 10:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(read_generations(jsonl))
    assert 10 <= partial < sum(len(v) for v in reference.values())
    assert read_manifest(jsonl.parent) is None
    with open(jsonl, "a") as fh:
        fh.write('{"image_id": "torn')  # a write cut short by the kill
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
from pipeline.rundir import output_lock
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
