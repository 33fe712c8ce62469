"""Paired bootstrap over test images: is one model's (or group of models') per-image score better than another's?

Both sides are scored on the same test images; each side's per-image score is first averaged over its seeds
(pooled), then the images are resampled with replacement ``resamples`` times and the mean difference (b - a) of
each resample gives the percentile interval. A difference is called **significant** only when that interval
excludes 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.evaluation.attributes import per_image_attributes
from pipeline.evaluation.metrics import CaptionScorer

RESAMPLES = 10_000
LEVEL = 0.95
BOOTSTRAP_SEED = 0  # fixed: the same files give the same interval
PER_IMAGE_METRICS = ("attributes", "CIDEr-D")  # what a student's per_image.json holds for each test image


def per_image_scores(scorer: CaptionScorer, references: Mapping[str, str], predictions: Mapping[str, str]
                     ) -> dict[str, dict[str, float]]:
    """Image id -> ``PER_IMAGE_METRICS`` of one predictions set against one reference caption per image."""
    attributes = per_image_attributes(references, predictions)
    cider = scorer.per_image_cider({k: [v] for k, v in references.items()}, predictions)
    return {k: {"attributes": attributes[k], "CIDEr-D": cider[k]} for k in references}


def pool_seeds(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each image's score averaged over ``runs`` (one per seed, all over the same images)."""
    if not runs:
        raise ValueError("no runs to pool")
    ids = set(runs[0])
    for run in runs[1:]:
        if set(run) != ids:
            raise ValueError(f"runs differ in images, e.g. {sorted(ids ^ set(run))[:5]}")
    return {k: float(np.mean([run[k] for run in runs])) for k in runs[0]}


def paired_bootstrap(a: Mapping[str, float], b: Mapping[str, float], *, resamples: int = RESAMPLES,
                     level: float = LEVEL, seed: int = BOOTSTRAP_SEED) -> dict:
    """Mean per-image difference ``b - a`` and its ``level`` percentile-bootstrap interval over the images:
    ``{"difference", "low", "high", "significant", "images", "resamples", "level"}``."""
    if set(a) != set(b):
        raise ValueError(f"the two sides differ in images, e.g. {sorted(set(a) ^ set(b))[:5]}")
    if not a:
        raise ValueError("no images to compare")
    ids = sorted(a)
    diff = np.array([b[k] - a[k] for k in ids], dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[picks].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"difference": float(diff.mean()), "low": float(low), "high": float(high),
            "significant": bool(low > 0 or high < 0), "images": len(diff), "resamples": resamples, "level": level}


def compare(a_runs: Sequence[Mapping[str, Mapping[str, float]]], b_runs: Sequence[Mapping[str, Mapping[str, float]]],
            metrics: Sequence[str] = PER_IMAGE_METRICS) -> dict[str, dict]:
    """:func:`paired_bootstrap` of every metric between two groups of runs (each run: image id -> metric ->
    score, e.g. a ``per_image.json``), each group pooled over its runs (seeds)."""
    out = {}
    for metric in metrics:
        a = pool_seeds([{k: v[metric] for k, v in run.items()} for run in a_runs])
        b = pool_seeds([{k: v[metric] for k, v in run.items()} for run in b_runs])
        out[metric] = paired_bootstrap(a, b)
    return out


def describe(result: Mapping) -> str:
    """``+0.012 [-0.004, +0.027]``, followed by ``significant`` when the interval excludes 0."""
    text = f"{result['difference']:+.3f} [{result['low']:+.3f}, {result['high']:+.3f}]"
    return f"{text} significant" if result["significant"] else text
