"""Caption normalisation and word tokenisation shared by `prepare` (Karpathy tokens, stats) and the students."""

from __future__ import annotations

import re

# words (whitespace-separated) a caption may have: real ones have under 100; METEOR's jar fails on ~24k
MAX_CAPTION_WORDS = 1000
_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")


def normalise(caption: str) -> str:
    """Collapse whitespace; keep case and punctuation (the stored caption text)."""
    return " ".join(caption.split())


def tokenize(caption: str, keep_punct: bool = True) -> list[str]:
    """Lower-case word tokens with punctuation split off ("t-shirt" and "v-shape" stay one word)."""
    tokens = _TOKEN.findall(caption.lower())
    return tokens if keep_punct else [t for t in tokens if t[0].isalnum()]
