"""Word vocabulary of a caption source: built from its training captions, saved with every student model."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from pipeline.data.text import tokenize

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)


class Vocabulary:
    """Maps words to ids (``<pad>=0 <start>=1 <end>=2 <unk>=3``); punctuation is split off as its own token."""

    def __init__(self, words: Sequence[str]):
        self.itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int) -> Vocabulary:
        counts = Counter(t for c in captions for t in tokenize(c))
        return cls(sorted(w for w, n in counts.items() if n >= min_count))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, caption: str, max_length: int) -> list[int]:
        """``<start> w1 .. wn <end>``, with at most ``max_length`` words."""
        ids = [self.stoi.get(t, self.unk_id) for t in tokenize(caption)][:max_length]
        return [self.start_id, *ids, self.end_id]

    def decode(self, ids: Iterable[int]) -> str:
        words = []
        for i in ids:
            if i == self.end_id:
                break
            if i not in (self.pad_id, self.start_id):
                words.append(self.itos[i])
        text = " ".join(words)
        return text.replace(" .", ".").replace(" ,", ",")

    def save(self, path: str | Path) -> None:
        from pipeline.core.rundir import atomic_write_json

        atomic_write_json(path, {"itos": self.itos})

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        itos = json.loads(Path(path).read_text())["itos"]
        if tuple(itos[:4]) != SPECIALS:
            raise ValueError(f"{path}: not a student vocabulary (specials {itos[:4]})")
        return cls(itos[4:])
