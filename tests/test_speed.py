"""What distillation buys: timing a captioner (structure, not speed: no timed assertions), and the report's table,
sentence and quality-vs-throughput plot built from a hand-made ``speed.json`` and hand-made metrics."""

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.core.archs import display_name
from pipeline.core.rundir import RunDir
from pipeline.evaluation.attributes import ATTRIBUTES
from pipeline.evaluation.results import finished_results
from pipeline.inference.speed import SpeedSettings, images_per_second, measure_student, read_speed, write_speed
from pipeline.reporting.plots import (
    colour_floor,
    epoch_means,
    plot_attribute_heatmap,
    plot_curves,
    plot_metric_bars,
    plot_speed_quality,
)
from pipeline.reporting.tables import (
    answer_markdown,
    gallery_html,
    gallery_summary,
    reference_teacher,
    results_markdown,
    speed_report,
    student_label,
)


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _student(rd: RunDir, arch: str, source: str, attributes: float, cider: float) -> None:
    folder = rd.students / f"{arch}__{source}"
    _write(folder / "manifest.json", {"fingerprint": f"fp-{arch}-{source}"})
    _write(folder / "metrics.json", {"arch": arch, "source": source, "test": {"CIDEr-D": cider, "BLEU-4": 0.1},
                                     "attributes": {"macro": attributes,
                                                    "per_attribute": dict.fromkeys(ATTRIBUTES, attributes)}})


def _distilled(rd: RunDir, name: str, temperature: float, attributes: float, cider: float) -> None:
    _write(rd.distill(name) / "manifest.json", {"fingerprint": f"fp-{name}"})
    _write(rd.distill(name) / "meta.json", {"temperature": temperature})
    _write(rd.distill(name) / "diagnostics.json",
           {"teacher_on_test": {"CIDEr-D": cider, "attributes": {"macro": attributes}}})


def _timed(name: str, rates: dict, **extra) -> dict:
    return {"name": name, "fingerprint": f"fp-{name.replace('__', '-')}" if name != "teacher" else "fp-teacher",
            "parameters": extra.pop("parameters"), "disk_bytes": extra.pop("disk_bytes"), "beam_size": 1,
            "images_per_s": rates, **extra}


def hand_made_run(root: Path) -> RunDir:
    """A run with a teacher, two distilled datasets, three students and their timings (batch sizes 1 and 32)."""
    rd = RunDir(root)
    _write(rd.teacher / "manifest.json", {"fingerprint": "fp-teacher"})
    _distilled(rd, "precise", 0.2, attributes=0.80, cider=0.50)
    _distilled(rd, "creative", 0.9, attributes=0.60, cider=0.30)
    _student(rd, "vgg19_gru", "gt", attributes=0.70, cider=0.90)
    _student(rd, "vit_transformer", "precise", attributes=0.72, cider=0.40)
    _student(rd, "vit_transformer", "creative", attributes=0.50, cider=0.20)
    models = [_timed("teacher", {"torch": {"1": 0.5, "32": 2.0}}, parameters=13_000_000_000, disk_bytes=26_000_000_000)]
    for name, scale in (("vgg19_gru__gt", 1.0), ("vit_transformer__precise", 2.0), ("vit_transformer__creative", 3.0)):
        arch, source = name.split("__")
        models.append(_timed(name, {"torch": {"1": 10 * scale, "32": 30 * scale}, "onnx": {"1": 20 * scale,
                                                                                          "32": 48 * scale}},
                             arch=arch, source=source, parameters=2_500_000, disk_bytes=10_000_000,
                             onnx_bytes=9_500_000))
    write_speed(rd, {"images": 64, "repeats": 3, "batch_sizes": [1, 32], "threads": 2,
                     "measured_at": "2026-01-01T00:00:00+0000", "models": models})
    return rd


def test_table_sentence_and_plot_from_speed_json_and_the_runs_metrics(tmp_path):
    rd = hand_made_run(tmp_path / "run")
    results, _ = finished_results(rd)
    report = speed_report(rd, results)
    assert report.batch_size == 32
    teacher, *students = report.records
    # the teacher's quality comes from its lowest-temperature captions; the students' from their metrics.json
    assert teacher["label"] == "teacher (precise captions, T=0.2)" and teacher["attributes"] == 0.80
    assert teacher["CIDEr-D"] == 0.50
    assert [(s["source"], s["attributes"], s["CIDEr-D"]) for s in students] == [
        ("gt", 0.70, 0.90), ("creative", 0.50, 0.20), ("precise", 0.72, 0.40)]
    md = report.markdown
    assert ("| teacher (precise captions, T=0.2) | — | 13.00 B | 26000.00 | — | 0.5 | 2 | — | — | 0.800 | 0.500 |"
            in md)
    assert "| ViT-B/16 + Transformer | precise | 2.50 M | 10.00 | 9.50 | 20 | 60 | 40 | 96 | 0.720 | 0.400 |" in md
    # the best student by attribute accuracy, at its fastest runtime at the largest batch, against the teacher
    assert ("**ViT-B/16 + Transformer trained on precise captions: 48× the teacher's throughput at 90% of its "
            "attribute accuracy (96 vs 2 images/s on 2 CPU threads, batch 32, onnxruntime; attribute accuracy "
            "0.720 vs the teacher's 0.800 on its precise captions).**") in md
    page = results_markdown(results, {}, [], report)
    assert "## What distillation buys" in page and "speed_quality.png" in page
    plot_speed_quality(report.records, report.batch_size, tmp_path / "speed_quality.png")
    with Image.open(tmp_path / "speed_quality.png") as im:
        assert im.format == "PNG" and im.size[0] > 600 and len(set(im.convert("L").getdata())) > 10


def test_the_report_works_without_timings(tmp_path):
    rd = hand_made_run(tmp_path / "run")
    (rd.speed / "speed.json").unlink()
    results, _ = finished_results(rd)
    assert read_speed(rd) is None and speed_report(rd, results) is None
    assert "What distillation buys" not in results_markdown(results, {}, [], None)


def test_a_model_retrained_since_it_was_timed_is_left_out_and_named(tmp_path):
    rd = hand_made_run(tmp_path / "run")
    _write(rd.students / "vit_transformer__precise" / "manifest.json", {"fingerprint": "retrained"})
    assert read_speed(rd)["stale"] == ["vit_transformer__precise"]
    report = speed_report(rd, finished_results(rd)[0])
    assert [r["source"] for r in report.records] == [None, "gt", "creative"]
    assert "retrained since they were timed: vit_transformer__precise" in report.markdown
    assert "VGG19 + GRU trained on ground-truth captions" in report.markdown  # the best of those left


class CountingCaptioner:
    def __init__(self):
        self.batches: list[int] = []

    def caption(self, images, beam_size):
        self.batches.append(len(images))
        return ["a caption"] * len(images)


def test_images_per_second_warms_up_then_times_whole_passes():
    captioner = CountingCaptioner()
    images = [Image.new("RGB", (8, 8))] * 5
    rate = images_per_second(captioner, images, batch_size=2, beam_size=1, repeats=3)
    assert rate > 0
    assert captioner.batches == [2] + [2, 2, 1] * 3  # one warm-up batch, then 3 passes over all 5 images


@pytest.mark.slow  # an ONNX export
def test_a_student_is_exported_then_timed_in_both_runtimes(tmp_path):
    from tests.helpers import make_student, varied_images

    folder = tmp_path / "vgg19_gru__gt"
    make_student(folder / "best", "vgg19_gru")
    _write(folder / "manifest.json", {"fingerprint": "fp"})
    settings = SpeedSettings(images=3, repeats=1, batch_sizes=(1, 2), threads=1)
    timed = measure_student(folder, varied_images(3), settings)
    best = folder / "best"
    assert (best / "onnx" / "onnx.json").is_file()
    assert {k: timed[k] for k in ("name", "arch", "source", "fingerprint", "beam_size")} == {
        "name": "vgg19_gru__gt", "arch": "vgg19_gru", "source": "gt", "fingerprint": "fp", "beam_size": 3}
    assert timed["disk_bytes"] == sum((best / f).stat().st_size for f in ("model.safetensors", "encoder.safetensors"))
    assert timed["onnx_bytes"] == sum(p.stat().st_size for p in (best / "onnx").glob("*.onnx")) > 0
    assert timed["parameters"] > 10_000
    assert set(timed["images_per_s"]) == {"torch", "onnx"}
    for rates in timed["images_per_s"].values():
        assert set(rates) == {"1", "2"} and all(rate > 0 for rate in rates.values())


def test_results_md_opens_with_the_teacher_the_best_student_of_each_source_and_the_recommendation(tmp_path):
    rd = hand_made_run(tmp_path / "run")
    results, baselines = finished_results(rd)
    baselines = {"gt": {"majority": {"macro": 0.40}}}
    teacher = reference_teacher(rd)
    assert (teacher["dataset"], teacher["attributes"]) == ("precise", 0.80)
    page = results_markdown(results, {}, [], None, None,
                            answer_markdown(results, baselines, teacher, speed_report(rd, results)))
    lines = page.splitlines()
    assert lines[:3] == ["# Results", "", "## The answer"]
    assert lines[4] == ("**Recommended: ViT-B/16 + Transformer trained on precise captions: 48× the teacher's "
                        "throughput at 90% of its attribute accuracy (96 vs 2 images/s on 2 CPU threads, batch 32, "
                        "onnxruntime; attribute accuracy 0.720 vs the teacher's 0.800 on its precise captions).**")
    table = page.split("## The answer")[1].split("All students are scored")[0]
    assert "| teacher: teacher, fine-tuned (its precise captions, T=0.2) | — | 0.800 | 100% | 0.500 |" in table
    for row in ("| best student: VGG19 + GRU | gt | 0.700 | 88% | 0.900 |",
                "| best student: ViT-B/16 + Transformer | creative | 0.500 | 62% | 0.200 |",
                "| best student: ViT-B/16 + Transformer | precise | 0.720 | 90% | 0.400 |",
                "| majority attributes (baseline) | gt | 0.400 | 50% | — |"):
        assert row in table, row
    # not timed: the recommendation still names the student and says how to time it
    untimed = answer_markdown(results, baselines, teacher, None)
    assert ("**Recommended: ViT-B/16 + Transformer trained on precise captions, at 90% of the teacher's attribute "
            "accuracy (not timed yet: `make speed`") in untimed


def test_a_stand_in_student_is_named_as_what_ran(tmp_path):
    rd = hand_made_run(tmp_path / "run")
    settings = {"width": 0.25, "image_size": 96, "pretrained": True, "stand_in": {"epochs": 3}}
    _write(rd.students / "vgg19_gru__gt" / "best" / "student.json", {"encoder": {"settings": settings}})
    results, _ = finished_results(rd)
    assert student_label(results[0]) == "VGG-family stand-in (width 0.25, 96 px) + GRU"
    assert display_name("resnet101_attn_gru", {**settings, "pretrained": False}) == (
        "ResNet-family stand-in (width 0.25, 96 px, random weights) grid + attention GRU")
    full = {"width": 1.0, "image_size": 224, "pretrained": True, "stand_in": None}
    assert display_name("vit_transformer", full) == "ViT-B/16 + Transformer"


def test_heat_map_floor_curves_by_epoch_and_metric_bars_with_the_teacher(tmp_path):
    assert colour_floor(0.62) == 0.55 and colour_floor(0.03) == 0.0 and colour_floor(None) == 0.0
    assert epoch_means([[1, 4.0], [2, 2.0], [3, 1.0], [4, 3.0]], 2.0) == ([1, 2], [3.0, 2.0])
    rd = hand_made_run(tmp_path / "run")
    results, _ = finished_results(rd)
    teacher = {**reference_teacher(rd), "test": {"CIDEr-D": 0.5, "BLEU-4": 0.2, "attributes": {"macro": 0.8}}}
    curves = {(r["arch"], r["source"]): {"train_loss": [[1, 3.0], [2, 2.0], [3, 1.5], [4, 1.2]],
                                         "val_attributes": [[2, 0.5], [4, 0.6]], "val_cider": [[2, 0.1], [4, 0.2]],
                                         "steps_per_epoch": 2.0} for r in results}
    plot_metric_bars(results, tmp_path / "metrics.png", teacher, 0.4)
    plot_curves(curves, tmp_path / "curves.png")
    plot_attribute_heatmap(["a", "b"], [[0.9] * len(ATTRIBUTES), [0.6] * len(ATTRIBUTES)], tmp_path / "attr.png",
                           floor=0.55)
    for png in ("metrics.png", "curves.png", "attr.png"):
        with Image.open(tmp_path / png) as im:
            assert im.format == "PNG" and len(set(im.convert("L").getdata())) > 10, png
    with Image.open(tmp_path / "curves.png") as im:  # a column per source: wider than tall
        assert im.size[0] > im.size[1]


def test_gallery_opens_with_a_summary_and_filters_by_model(tmp_path):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "a.jpg")
    truth = "The lady wears a long-sleeve shirt with cotton fabric. She wears long pants."
    samples = [{"image_id": f"img{i}", "image_path": str(tmp_path / "a.jpg"),
                "captions": {"ground truth": truth, "teacher (precise)": truth,
                             "VGG19 + GRU ← gt": "The gentleman wears a long-sleeve shirt with cotton fabric."}}
               for i in range(2)]
    summary = {label: rest for label, *rest in gallery_summary(samples)}
    right, wrong, missed, share = summary["teacher (precise)"]
    assert wrong == missed == 0 and right > 0 and share == 1.0
    right_s, wrong_s, missed_s, share_s = summary["VGG19 + GRU ← gt"]
    assert wrong_s >= 2 and missed_s >= 2 and share_s == right_s / (right_s + wrong_s + missed_s) < 1  # 2 images
    page = gallery_html(samples, "t")
    assert page.index('class="summary"') < page.index('class="card"')
    assert '<option value="VGG19 + GRU ← gt">' in page and "<script>" in page
    assert page.count('data-model="teacher (precise)"') == 2 and page.count('data-model="ground truth"') == 2
    assert "src=\"http" not in page and "<script src" not in page  # self-contained


@pytest.mark.slow  # fine-tunes a tiny teacher
def test_the_chains_speed_step_times_every_model_quickly_then_stays_current(teacher_world, caplog):
    """The `speed` stage on a run with a fine-tuned teacher and students: the teacher and the best student of each
    source in PyTorch (no ONNX export of its own), a manifest the plan's up-to-date rule accepts, and a rerun only
    when what it must time changed."""
    from argparse import Namespace

    from pipeline.core.config import load_config
    from pipeline.core.rundir import is_up_to_date, read_manifest
    from pipeline.workflows import depends
    from stages import finetune, speed
    from tests.helpers import make_student

    cfg = load_config(teacher_world("speed", teacher={"train": {"epochs": 1, "eval_generation_samples": 0}},
                                    distill={"max_new_tokens": 24}))
    finetune.run(cfg, Namespace(force=False))
    rd = RunDir(cfg.run_dir)
    for name, attributes in (("vgg19_gru__gt", 0.7), ("vit_transformer__gt", 0.6), ("vit_transformer__precise", 0.5),
                             ("vgg19_gru__sweep-t0.5", 0.9)):
        arch, source = name.split("__")
        make_student(rd.students / name / "best", arch)
        _student(rd, arch, source, attributes=attributes, cider=0.1)
    args = Namespace(force=False, images=3, batch_sizes="1,3", repeats=1)
    speed.run(cfg, args)
    timed = json.loads((rd.speed / "speed.json").read_text())
    # the teacher and the best student of each source (the sweep's students are not the report's)
    assert [m["name"] for m in timed["models"]] == ["teacher", "vgg19_gru__gt", "vit_transformer__precise"]
    assert timed["batch_sizes"] == [1, 3] and timed["images"] == 3 and "quick" in timed["measured_by"]
    for model in timed["models"]:
        assert set(model["images_per_s"]) == {"torch"} and set(model["images_per_s"]["torch"]) == {"1", "3"}
    assert not (rd.students / "vgg19_gru__gt" / "best" / "onnx").exists()  # no export of its own
    assert is_up_to_date(rd.speed, *depends.speed(cfg, rd))
    before = read_manifest(rd.speed)
    with caplog.at_level("INFO"):
        speed.run(cfg, args)
    assert read_manifest(rd.speed) == before and "is up to date" in caplog.text
    _student(rd, "vit_transformer", "gt", attributes=0.8, cider=0.1)  # now the best of its source: not timed yet
    assert not is_up_to_date(rd.speed, *depends.speed(cfg, rd))
