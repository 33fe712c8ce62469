"""Describe a set of captions: length distribution, vocabulary, distinct-n (diversity)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from pipeline.data.text import tokenize


def distinct_n(token_lists: Sequence[Sequence[str]], n: int) -> float:
    """Unique n-grams / all n-grams over the corpus (Li et al., 2016)."""
    grams = [tuple(t[i: i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def caption_diagnostics(captions: Sequence[str]) -> dict[str, Any]:
    tokens = [tokenize(c, keep_punct=False) for c in captions]
    lengths = [len(t) for t in tokens]
    if not lengths:
        return {"captions": 0}
    q = statistics.quantiles(lengths, n=20) if len(lengths) > 1 else [lengths[0]] * 19
    return {
        "captions": len(lengths),
        "length_mean": round(statistics.fmean(lengths), 3),
        "length_p5": q[0], "length_p50": statistics.median(lengths), "length_p95": q[-1],
        "vocabulary": len({w for t in tokens for w in t}),
        "distinct_1": round(distinct_n(tokens, 1), 5),
        "distinct_2": round(distinct_n(tokens, 2), 5),
        "unique_captions": len(set(captions)),
    }
