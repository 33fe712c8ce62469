"""n-gram blocking (``students.no_repeat_ngram``) in greedy and beam search, PyTorch and onnxruntime's numpy decoder,
on a decoder that always prefers the same words (so it repeats them without blocking)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.students import beam as torch_decoding
from pipeline.students import onnx_runtime as numpy_decoding
from pipeline.students.runtime import repeated_ngram_bans

VOCAB, START, END, MAX_LENGTH = 12, 1, 2, 20
# one fixed preference over the words (4 first, then 5, ...) whatever came before; <end> least likely
WORDS = -np.cumsum(np.random.default_rng(0).uniform(0.2, 1.0, VOCAB - 4))
LOGITS = np.array([-50.0, -50.0, -40.0, -50.0, *WORDS], dtype=np.float32)
# a small dependence on the previous word, so that no two captions tie in beam search either
AFTER = np.random.default_rng(1).uniform(0.0, 0.1, (VOCAB, VOCAB)).astype(np.float32)


class Repeater:
    """A decoder forced to repeat: nearly the same next-word distribution at every step, for every image."""

    def __init__(self, numpy: bool):
        self.numpy = numpy

    def init_state(self, feats):
        return {"h": feats}

    def step(self, state, tokens):
        logits = LOGITS + AFTER[np.asarray(tokens)]
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return (logp.astype(np.float32) if self.numpy else torch.from_numpy(logp)), state


def repeated_ngrams(seq: list[int], n: int) -> list[tuple[int, ...]]:
    grams = [tuple(seq[i: i + n]) for i in range(len(seq) - n + 1)]
    return sorted({g for g in grams if grams.count(g) > 1})


def decode(kind: str, numpy: bool, n: int) -> list[list[int]]:
    feats = np.zeros((3, 4), dtype=np.float32)
    module = numpy_decoding if numpy else torch_decoding
    x = feats if numpy else torch.from_numpy(feats)
    if kind == "greedy":
        return module.greedy_decode(Repeater(numpy), x, MAX_LENGTH, START, END, n)
    return module.beam_search(Repeater(numpy), x, 3, MAX_LENGTH, START, END, n)


@pytest.mark.parametrize("kind", ["greedy", "beam"])
@pytest.mark.parametrize("numpy", [False, True], ids=["torch", "numpy"])
def test_ngram_blocking_removes_every_repeated_ngram(kind, numpy):
    assert repeated_ngrams(decode(kind, numpy, 0)[0], 2), "the decoder must repeat itself without blocking"
    for n in (1, 2, 3):
        for seq in decode(kind, numpy, n):
            assert seq and not repeated_ngrams(seq, n), (n, seq)
    # the same captions from both runtimes
    assert decode(kind, numpy, 2) == decode(kind, not numpy, 2)


def test_bans_name_the_tokens_that_would_repeat():
    assert repeated_ngram_bans([[4, 5, 4], [4, 5, 6]], 2) == [[5], []]
    assert repeated_ngram_bans([[4, 5, 4, 7, 4]], 2) == [[5, 7]]
    assert repeated_ngram_bans([[4, 5]], 1) == [[4, 5]]
    assert repeated_ngram_bans([[4, 5, 4]], 0) == [[]]


def test_blocking_is_measured_on_the_validation_split_of_every_trained_student(make_config):
    """The `make bench` ngram section's measurement on a tiny trained run: every student decodes the validation
    images with blocking off (its figures are score_checkpoint's) and at n=2 (no caption repeats a bigram); the
    pooled comparison has an interval; the test split is not decoded."""
    from argparse import Namespace

    import stages.students as students
    from pipeline.core.config import load_config
    from pipeline.workflows import repetition
    from stages import prepare

    path = make_config(students={"archs": ["vgg19_gru"], "epochs": 2, "batch_size": 16, "beam_size": 2,
                                 "val_every_epochs": 2, "seeds": [0, 1],
                                 "encoder": {"pretrained": False, "width": 0.125, "image_size": 32}})
    cfg = load_config(path)
    prepare.run(cfg, Namespace(force=False))
    students.run(cfg, Namespace(force=False, wait=False))
    splits = []
    score = repetition.score_checkpoint

    def scoring(folder, rows, *args, **kwargs):
        splits.append({r["split"] for r in rows})
        return score(folder, rows, *args, **kwargs)

    repetition.score_checkpoint = scoring
    try:
        found = repetition.blocking_on_validation(cfg, sizes=(2,))
    finally:
        repetition.score_checkpoint = score
    assert splits == [{"val"}] * 4  # two seeds, off and n=2
    assert set(found["students"]) == {"vgg19_gru__gt", "vgg19_gru__gt__s1"}
    for figures in found["students"].values():
        assert set(figures) == {0, 2} and figures[2]["repeats"][2] == 0.0
        assert 0 <= figures[0]["attributes"] <= 1 and figures[0]["CIDEr-D"] >= 0
    pooled = found["pooled"][2]
    for metric in ("attributes", "CIDEr-D"):
        assert pooled[metric]["images"] == found["images"] and pooled[metric]["low"] <= pooled[metric]["high"]
    assert repetition.repeats("a red top and a red skirt", 2) and not repetition.repeats("a red top. a skirt.", 2)
