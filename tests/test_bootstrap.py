"""The paired bootstrap over test images (pipeline/evaluation/bootstrap.py) and the per-image scores it resamples."""

from __future__ import annotations

import json

import pytest

from pipeline.evaluation.attributes import attribute_accuracy, per_image_attributes
from pipeline.evaluation.bootstrap import compare, describe, paired_bootstrap, per_image_scores, pool_seeds
from pipeline.evaluation.metrics import CaptionScorer
from pipeline.evaluation.predictions import read_predictions

REFS = {"1": "the lady wears a short-sleeve shirt with pure color patterns. it is cotton fabric.",
        "2": "the gentleman wears a long-sleeve sweater. the sweater is with cotton fabric.",
        "3": "this woman is wearing a tank top with graphic patterns and denim shorts.",
        "4": "the person wears a long-sleeve shirt and long pants. the pants are denim."}
HYPS = {"1": "the lady wears a long-sleeve shirt with pure color patterns.",
        "2": "the gentleman wears a long-sleeve sweater with cotton fabric.",
        "3": "this woman is wearing a tank top and denim shorts.",
        "4": "the lady wears a short-sleeve shirt and shorts."}


def test_hand_computed_interval():
    """Per-image differences (0, 0, 3): a resample's mean is (number of 3s drawn), P = 8/27 for 0 and 1/27 for 3,
    so the 2.5% and 97.5% points are 0 and 3: mean +1, interval [0, 3], not significant. (1, 1, 4): [1, 4],
    significant."""
    a = {"x": 0.0, "y": 0.0, "z": 0.0}
    result = paired_bootstrap(a, {"x": 0.0, "y": 0.0, "z": 3.0})
    assert (result["difference"], result["low"], result["high"]) == pytest.approx((1.0, 0.0, 3.0))
    assert not result["significant"]
    result = paired_bootstrap(a, {"x": 1.0, "y": 1.0, "z": 4.0})
    assert (result["difference"], result["low"], result["high"]) == pytest.approx((2.0, 1.0, 4.0))
    assert result["significant"] and describe(result) == "+2.000 [+1.000, +4.000] significant"
    # negative differences: b worse than a, significant below 0
    assert paired_bootstrap({"x": 1.0, "y": 2.0}, {"x": 0.0, "y": 0.5})["high"] < 0


def test_seeds_are_pooled_per_image():
    assert pool_seeds([{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 0.0}]) == {"a": 0.5, "b": 0.0}
    with pytest.raises(ValueError, match="differ in images"):
        pool_seeds([{"a": 1.0}, {"b": 1.0}])
    runs_a = [{"x": {"m": 0.0}, "y": {"m": 0.0}, "z": {"m": 0.0}}]
    runs_b = [{"x": {"m": 0.0}, "y": {"m": 0.0}, "z": {"m": 6.0}}, {"x": {"m": 0.0}, "y": {"m": 0.0}, "z": {"m": 0.0}}]
    assert compare(runs_a, runs_b, ("m",))["m"]["high"] == pytest.approx(3.0)


def test_per_image_scores_average_to_the_corpus_figures():
    with CaptionScorer(meteor=False) as scorer:
        per_image = per_image_scores(scorer, REFS, HYPS)
        corpus = scorer.score({k: [v] for k, v in REFS.items()}, HYPS, only=("CIDEr-D",))["CIDEr-D"]
    assert sum(v["CIDEr-D"] for v in per_image.values()) / 4 == pytest.approx(corpus)
    assert sum(per_image_attributes(REFS, HYPS).values()) / 4 == pytest.approx(attribute_accuracy(REFS, HYPS)["macro"])
    assert len({round(v["CIDEr-D"], 6) for v in per_image.values()}) == 4  # really per image


def test_identical_prediction_files_are_not_significant(tmp_path):
    rows = [{"image_id": k, "image_path": f"images/{k}.jpg", "caption": v} for k, v in REFS.items()]
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"image_id": k, "caption": v}) + "\n"
                                                        for k, v in HYPS.items()))
    with CaptionScorer(meteor=False) as scorer:
        a, b = (per_image_scores(scorer, REFS, read_predictions(tmp_path / f"{n}.jsonl", rows)) for n in "ab")
    for metric, result in compare([a], [b]).items():
        assert (result["difference"], result["low"], result["high"], result["significant"]) == (0, 0, 0, False), metric
        assert "significant" not in describe(result)


def test_report_section_compares_sources_and_scst_with_intervals(tmp_path):
    from pipeline.reporting.tables import comparisons_markdown

    results = []
    for name, source, shift in (("a", "gt", 0.0), ("b", "gt", 0.0), ("c", "precise", 0.5)):
        folder = tmp_path / name
        folder.mkdir()
        best = {str(i): {"attributes": 0.5 + shift + 0.01 * i, "CIDEr-D": 1.0 + 0.1 * i} for i in range(20)}
        run = {"best": best}
        if source == "precise":
            run.update(cross_entropy=best, scst=best)
        (folder / "per_image.json").write_text(json.dumps(run))
        results.append({"arch": "vgg19_gru", "source": source, "folder": folder})
    text = comparisons_markdown(results)
    lines = [line for line in text.splitlines() if line.startswith("| VGG19")]
    assert "precise vs ground truth" in lines[0] and "| 1 / 2 |" in lines[0]
    assert "+0.500 [+0.500, +0.500] significant" in lines[0] and "+0.000 [+0.000, +0.000] |" in lines[0]
    assert "SCST vs cross-entropy (precise)" in lines[1] and "significant" not in lines[1]
    assert comparisons_markdown([{"arch": "vgg19_gru", "source": "gt", "folder": tmp_path / "none"}]) is None


def test_seeds_are_one_row_each_with_their_mean_spread_and_count(tmp_path):
    """Three seeds of one (architecture, source) and one of another: summary.md, results.md and the CSVs have one
    row each, the mean over the seeds (± their standard deviation in markdown, the mean in CSV) and the number of
    seeds; the curves plot and the gallery take the first seed, named."""
    import time

    from pipeline.core.config import load_config
    from pipeline.core.rundir import RunDir, atomic_write_json, write_manifest
    from pipeline.evaluation.attributes import ATTRIBUTES
    from pipeline.evaluation.results import attribute_matrix, finished_results, merge_seeds
    from pipeline.reporting.tables import results_markdown
    from pipeline.workflows.students import write_summary
    from tests.helpers import write_config

    rd = RunDir(load_config(write_config(tmp_path)).run_dir)
    for folder, seed, cider in (("vgg19_gru__gt", 0, 0.85), ("vgg19_gru__gt__s1", 1, 0.86),
                                ("vgg19_gru__gt__s2", 2, 0.87), ("vgg19_gru__precise", 0, 0.9)):
        out = rd.students / folder
        atomic_write_json(out / "metrics.json", {
            "arch": "vgg19_gru", "source": folder.split("__")[1], "seed": seed,
            "test": {"BLEU-4": 0.3, "CIDEr-D": cider, "METEOR": 0.2, "ROUGE-L": 0.5},
            "attributes": {"macro": cider - 0.1, "per_attribute": {a: 0.5 for a in ATTRIBUTES}},
            "image_reliance": {"attribute_macro_drop": 0.1, "cider_drop": cider / 2}})
        write_manifest(out, stage="students", config={}, inputs={}, started=time.time())
    results, baselines = finished_results(rd)
    assert len(results) == 4
    summary = write_summary(rd).splitlines()
    assert summary[0].startswith("| model | trained on | seeds | BLEU-4 | CIDEr-D |")
    gt = [line for line in summary if "| gt |" in line]
    assert gt == ["| VGG19 + GRU | gt | 3 | 0.300 ± 0.000 | 0.860 ± 0.010 | 0.200 ± 0.000 | 0.500 ± 0.000 | "
                  "0.760 ± 0.010 | 0.100 ± 0.000 | 0.430 ± 0.005 |"]
    assert "| VGG19 + GRU | precise | 1 | 0.300 | 0.900 |" in "\n".join(summary)
    csv_rows = (rd.students / "summary.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and csv_rows[1].startswith("VGG19 + GRU,gt,3,0.3,0.86")
    md = results_markdown(results, baselines, [])
    assert md.count("| VGG19 + GRU | gt |") == 2  # the results table and the per-attribute table, once each
    labels, _ = attribute_matrix(results, baselines)
    assert labels == ["VGG19 + GRU ← gt", "VGG19 + GRU ← precise"]
    merged = merge_seeds(results)
    assert [m["folder"].name for m in merged] == ["vgg19_gru__gt", "vgg19_gru__precise"]
    assert [(m["seeds"], m["seed"]) for m in merged] == [(3, 0), (1, 0)]  # the curves plot shows the first seed's
