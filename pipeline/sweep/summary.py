"""The sweep's choice and table, from its point records (:mod:`pipeline.sweep.points`).

The best temperature is the temperature point whose student scores best on the ground-truth **validation** split on
``sweep.select_on`` (ties: the other of attribute accuracy and CIDEr-D, then the lower temperature). The test split
never takes part; its scores are reported beside. Extra points are compared with what they add to: k samples per
image with one sample at the same temperature, the unlabelled images with the ground truth alone; k samples with
their step control (k = 1 trained for as many optimizer steps), and the step control with k = 1: how much of k's
gain is training length. The intervals of these comparisons come from the paired bootstrap over the images
(:func:`pipeline.workflows.sweep.comparison_intervals`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.core.config import SweepConfig
from pipeline.core.errors import PipelineError
from pipeline.sweep.points import GT, SAMPLES, STEPS, TEMPERATURE, UNLABELED

VAL_METRICS = ("attributes", "CIDEr-D", "BLEU-4")
TEST_METRICS = ("attributes", "CIDEr-D", "BLEU-4", "METEOR", "ROUGE-L")
SWEEP_COLUMNS = ("point", "trained on", "T", "k", "val attributes", "val CIDEr-D", "test attributes",
                 "test CIDEr-D", "test BLEU-4", "test METEOR", "test ROUGE-L", "teacher distinct-2",
                 "teacher mean length", "teacher attributes vs GT", "teacher CIDEr-D vs GT", "chosen")


def _other(metric: str) -> str:
    return "CIDEr-D" if metric == "attributes" else "attributes"


def _key(metric: str):
    return lambda r: (r["val"][metric], r["val"][_other(metric)], -(r["temperature"] or 0.0))


def select_best(records: Sequence[dict], metric: str, *, above_zero: bool = False) -> dict:
    """The temperature point with the best validation ``metric`` (ties: the other metric, then the lower
    temperature); ``above_zero`` leaves greedy decoding (T=0) out."""
    candidates = [r for r in records if r["kind"] == TEMPERATURE and (r["temperature"] > 0 or not above_zero)]
    if not candidates:
        raise PipelineError("sweep.temperatures: no temperature point" + " above 0" * above_zero + " to choose from")
    return max(candidates, key=_key(metric))


def best_temperatures(records: Sequence[dict], sweep: SweepConfig) -> tuple[float, float | None]:
    """The chosen temperature and the one the k-sample points run at (the best above 0; None without one)."""
    best = select_best(records, sweep.select_on)["temperature"]
    if best > 0 or not any(r["kind"] == TEMPERATURE and r["temperature"] > 0 for r in records):
        return best, best if best > 0 else None
    return best, select_best(records, sweep.select_on, above_zero=True)["temperature"]


def _gain(point: dict, baseline: dict) -> dict[str, dict[str, float]]:
    return {split: {m: point[split][m] - baseline[split][m] for m in ("attributes", "CIDEr-D")}
            for split in ("val", "test")}


def comparisons(records: Sequence[dict]) -> list[dict]:
    """What each extra point did to the student, as measured: the gain (negative: loss) in attribute accuracy and
    CIDEr-D on validation and test of each point over what it is compared with (the module docstring), each as
    ``{"what", "point", "baseline", "gain"}``."""
    by_kind: dict[tuple, dict] = {(r["kind"], r["temperature"]): r for r in records}
    by_point = {r["point"]: r for r in records}
    pairs = []
    for r in records:
        if r["kind"] == SAMPLES and (TEMPERATURE, r["temperature"]) in by_kind:
            pairs.append((f"k={r['samples_per_image']} vs k=1 captions per image at T={r['temperature']:g}", r,
                          by_kind[(TEMPERATURE, r["temperature"])]))
        elif r["kind"] == UNLABELED and (GT, None) in by_kind:
            pairs.append((f"ground truth + teacher captions (T={r['temperature']:g}) of the unlabelled images vs "
                          "ground truth", r, by_kind[(GT, None)]))
        elif r["kind"] == STEPS and r["control_of"] in by_point:
            many, one = by_point[r["control_of"]], by_kind.get((TEMPERATURE, r["temperature"]))
            k, t = many["samples_per_image"], r["temperature"]
            pairs.append((f"k={k} vs k=1 trained for as many optimizer steps ({many['steps']} vs {r['steps']}) "
                          f"at T={t:g}", many, r))
            if one is not None:
                pairs.append((f"k=1 trained as long as k={k} vs k=1 ({r['steps']} vs {one['steps']} optimizer steps) "
                              f"at T={t:g}: training length alone", r, one))
    return [{"what": what, "point": r["point"], "baseline": base["point"], "gain": _gain(r, base)}
            for what, r, base in pairs]


def best_summary(records: Sequence[dict], sweep: SweepConfig) -> dict[str, Any]:
    """``best.json``: the chosen temperature with the validation scores it was chosen on and the test scores beside,
    the temperature the k-sample points run at, the best k (when k varied: chosen the same way among the points at
    that temperature) and the comparisons."""
    best = select_best(records, sweep.select_on)
    _, samples_at = best_temperatures(records, sweep)
    summary = {"select_on": f"validation {sweep.select_on}", "ties": f"validation {_other(sweep.select_on)}, then "
               "the lower temperature", "temperature": best["temperature"], "point": best["point"],
               "dataset": best["dataset"], "student": best["student"], "validation": best["val"],
               "test": best["test"], "samples_temperature": samples_at}
    if any(r["kind"] == SAMPLES for r in records):
        pool = [r for r in records if r["temperature"] == samples_at and r["kind"] in (TEMPERATURE, SAMPLES)]
        top = max(pool, key=_key(sweep.select_on))
        summary["samples_per_image"] = {"k": top["samples_per_image"], "temperature": samples_at,
                                        "point": top["point"], "validation": top["val"], "test": top["test"]}
    summary["comparisons"] = comparisons(records)
    return summary


def sweep_rows(records: Sequence[dict], best: dict) -> list[list[Any]]:
    """Rows of :data:`SWEEP_COLUMNS`, one per point."""
    rows = []
    for r in records:
        teacher, agree = r["teacher"], r["teacher"].get("vs_ground_truth") or {}
        rows.append([r["point"], r["source"], r["temperature"], r["samples_per_image"] if r["dataset"] else None,
                     *(r["val"][m] for m in VAL_METRICS[:2]), *(r["test"][m] for m in TEST_METRICS),
                     teacher.get("distinct_2"), teacher.get("length_mean"), agree.get("attributes"),
                     agree.get("CIDEr-D"), "✓" if r["point"] == best["point"] else ""])
    return rows
