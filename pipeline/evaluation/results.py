"""Baselines and the students' results table, in one place for the `students` summary and the `report`.

Two baselines per caption source, both scored on the ground-truth test split: the **constant caption** (the most
frequent training caption for every test image; n-gram metrics and the attributes it states) and the **majority
attributes** (every attribute answered with its most frequent value in the source's training captions: what a
captioner that ignores the image can reach at best, attribute by attribute).
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.core.archs import ARCHS, display_name
from pipeline.core.rundir import RunDir, atomic_write_json, is_sweep_source, output_lock, read_manifest
from pipeline.evaluation.attributes import ATTRIBUTES, attribute_accuracy, majority_baseline
from pipeline.evaluation.metrics import CaptionScorer

COURSE_METRICS = ("BLEU-4", "CIDEr-D", "METEOR", "ROUGE-L")  # the course reports' column order
ATTRIBUTE_COLUMNS = ("attributes", "image withheld: attr. drop", "image withheld: CIDEr-D drop")
RESULT_COLUMNS = ("model", "trained on", "seeds", *COURSE_METRICS, *ATTRIBUTE_COLUMNS)
CONSTANT, MAJORITY = "constant caption (baseline)", "majority attributes (baseline)"


def source_baselines(scorer: CaptionScorer, train_captions: Sequence[str], test_rows: Sequence[dict]) -> dict:
    """Both baselines of a caption source (see the module docstring)."""
    caption, count = Counter(train_captions).most_common(1)[0]
    references = {r["image_id"]: r["caption"] for r in test_rows}
    constant = {k: caption for k in references}
    return {"caption": caption, "train_count": count,
            "test": scorer.score({k: [v] for k, v in references.items()}, constant),
            "attributes": attribute_accuracy(references, constant),
            "majority": majority_baseline(train_captions, references)}


def write_source_baselines(folder: Path, inputs: dict[str, Any], scorer: CaptionScorer,
                           train_captions: Sequence[str], test_rows: Sequence[dict]) -> None:
    """``folder/metrics.json``: :func:`source_baselines`, with the ``inputs`` (fingerprints) they were computed from;
    kept as it is when those match (every students step of a source shares one; they take turns under a lock)."""
    file = folder / "metrics.json"
    with output_lock(folder, wait=True):  # the lock file is beside the folder: no folder without its metrics.json
        if file.is_file() and json.loads(file.read_text()).get("inputs") == inputs:
            return
        atomic_write_json(file, {**source_baselines(scorer, train_captions, test_rows), "inputs": inputs})


def _encoder_settings(student_json: Path) -> dict | None:
    """The encoder settings a student ran with (its ``student.json``), for its honest display name."""
    return json.loads(student_json.read_text())["encoder"]["settings"] if student_json.is_file() else None


def finished_results(rd: RunDir) -> tuple[list[dict], dict[str, dict]]:
    """metrics.json of every finished student (with ``folder`` and ``encoder``, its encoder settings) and every
    baseline in the run, students in the course reports' order (ground truth first, then sources by name); the
    temperature sweep's students are left to its own table."""
    results, baselines = [], {}
    for folder in sorted(rd.students.glob("*__*")):
        if is_sweep_source(folder.name.split("__", 1)[1]):
            continue
        if folder.name.startswith("baseline__"):
            if (folder / "metrics.json").is_file():  # else another step is computing it right now
                baselines[folder.name.split("__", 1)[1]] = json.loads((folder / "metrics.json").read_text())
        elif read_manifest(folder) is not None:
            results.append({**json.loads((folder / "metrics.json").read_text()), "folder": folder,
                            "encoder": _encoder_settings(folder / "best" / "student.json")})
    order = list(ARCHS)
    results.sort(key=lambda r: (r["source"] != "gt", r["source"],
                                order.index(r["arch"]) if r["arch"] in order else len(order)))
    return results, baselines


class SeedMean(float):
    """A figure averaged over seeds: as a number (CSV, plots) the mean; formatted, the mean and the standard deviation
    over the seeds (``f"{x:.3f}"`` gives ``0.861 ± 0.006``)."""

    def __new__(cls, values: Sequence[float]) -> SeedMean:
        mean = super().__new__(cls, statistics.fmean(values))
        mean.sd, mean.n = statistics.stdev(values), len(values)
        return mean

    def __format__(self, spec: str) -> str:
        return f"{float(self):{spec}} ± {self.sd:{spec}}"


def _mean(values: Sequence[float | None]) -> float | None:
    """One seed's figure as it is, several seeds' as a :class:`SeedMean`; None when a seed lacks it."""
    if not values or any(v is None for v in values):
        return None
    return values[0] if len(values) == 1 else SeedMean(values)


def merge_seeds(results: Sequence[dict]) -> list[dict]:
    """One entry per (architecture, source) of ``results`` (:func:`finished_results`, one per seed), in their order:
    ``arch``, ``source``, ``seeds`` (how many), ``runs`` (the seeds' entries), ``folder`` and ``seed`` (the first
    seed's) and the figures the tables show (``test``, ``attributes``, ``image_reliance``) as the mean over the seeds
    (:func:`_mean`)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["arch"], r["source"]), []).append(r)
    merged = []
    for (arch, source), runs in groups.items():
        entry = {"arch": arch, "source": source, "seeds": len(runs), "runs": runs, "folder": runs[0]["folder"],
                 "encoder": runs[0].get("encoder"),
                 "seed": runs[0].get("seed"), "test": {m: _mean([r["test"].get(m) for r in runs])
                                                       for m in runs[0]["test"]},
                 "image_reliance": {k: _mean([r.get("image_reliance", {}).get(k) for r in runs])
                                    for k in ("attribute_macro_drop", "cider_drop")}}
        if all("attributes" in r for r in runs):
            entry["attributes"] = {"macro": _mean([r["attributes"]["macro"] for r in runs]),
                                   "per_attribute": {a: _mean([r["attributes"]["per_attribute"][a] for r in runs])
                                                     for a in runs[0]["attributes"]["per_attribute"]}}
        merged.append(entry)
    return merged


def result_rows(results: Sequence[dict], baselines: dict[str, dict]) -> list[list[Any]]:
    """Rows of ``RESULT_COLUMNS``: each (architecture, source), its figures the mean over its seeds
    (:func:`merge_seeds`), then each source's two baselines."""
    rows = []
    for r in merge_seeds(results):
        reliance = r["image_reliance"]
        rows.append([display_name(r["arch"], r["encoder"]), r["source"], r["seeds"],
                     *(r["test"].get(m) for m in COURSE_METRICS), r.get("attributes", {}).get("macro"),
                     reliance["attribute_macro_drop"], reliance["cider_drop"]])
    for source, b in baselines.items():
        rows.append([CONSTANT, source, None, *(b["test"].get(m) for m in COURSE_METRICS),
                     b.get("attributes", {}).get("macro"), None, None])
        rows.append([MAJORITY, source, None, *(None for _ in COURSE_METRICS), b.get("majority", {}).get("macro"),
                     None, None])
    return rows


def attribute_matrix(results: Sequence[dict], baselines: dict[str, dict]) -> tuple[list[str], list[list[float]]]:
    """(row labels, per-attribute accuracies in ``ATTRIBUTES`` order): every student (the mean over its seeds), then
    the ground truth's majority baseline."""
    labels, values = [], []
    for r in merge_seeds(results):
        if "attributes" in r:
            labels.append(f"{display_name(r['arch'], r.get('encoder'))} ← {r['source']}")
            values.append([r["attributes"]["per_attribute"][a] for a in ATTRIBUTES])
    if "majority" in baselines.get("gt", {}):
        labels.append("majority baseline (gt)")
        values.append([baselines["gt"]["majority"]["per_attribute"][a] for a in ATTRIBUTES])
    return labels, values


def best_per_source(results: Sequence[dict]) -> list[dict]:
    """The best student of each caption source by test attribute accuracy (ties: CIDEr-D), in ``results``' order of
    sources: the report's answer compares them with the teacher, and the chain's quick `speed` step times them."""
    best: dict[str, dict] = {}
    for r in results:
        if r["source"] not in best or _rank(r) > _rank(best[r["source"]]):
            best[r["source"]] = r
    return list(best.values())


def _rank(result: dict) -> tuple[float, float]:
    return result.get("attributes", {}).get("macro", -1.0), result["test"].get("CIDEr-D", -1.0)
