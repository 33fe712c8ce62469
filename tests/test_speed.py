"""What distillation buys: timing a captioner (structure, not speed: no timed assertions), and the report's table,
sentence and quality-vs-throughput plot built from a hand-made ``speed.json`` and hand-made metrics."""

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.core.rundir import RunDir
from pipeline.evaluation.attributes import ATTRIBUTES
from pipeline.evaluation.results import finished_results
from pipeline.inference.speed import SpeedSettings, images_per_second, measure_student, read_speed, write_speed
from pipeline.reporting.plots import plot_speed_quality
from pipeline.reporting.tables import results_markdown, speed_report


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
