"""A student exported to ONNX (``make export``), run with onnxruntime and numpy only: no torch at inference.

``<best>/onnx/`` holds three graphs: ``encoder.onnx`` (pixels -> decoder input features), ``init_state.onnx``
(features -> the decoder's state tensors) and ``step.onnx`` (state + previous tokens -> next-token
log-probabilities + the state entries that change), and ``onnx.json`` naming the state tensors in order. Greedy and
beam search here mirror :mod:`pipeline.students.beam` operation for operation (float32 scores, the same
length-normalised choice of the best beam), so both runtimes write the same captions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from pipeline.core.cpus import cpu_share
from pipeline.core.errors import PipelineError
from pipeline.students.runtime import read_student_json, repeated_ngram_bans, require_files, to_pixels, until_end
from pipeline.students.vocab import Vocabulary

ONNX_FORMAT = 1
GRAPHS = ("encoder", "init_state", "step")
State = dict[str, np.ndarray]


def student_fingerprint(folder: Path) -> str:
    """sha256 of the decoder weights and vocabulary an export was made from (a retrained student differs)."""
    h = hashlib.sha256()
    for name in ("model.safetensors", "vocab.json"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def read_onnx_json(folder: Path, onnx_dir: Path) -> dict:
    """``onnx_dir/onnx.json``, checked to be complete and to belong to the student in ``folder``."""
    path = onnx_dir / "onnx.json"
    if not path.is_file():
        raise PipelineError(f"{path} not found: export the student first (make export STUDENT={folder})")
    meta = json.loads(path.read_text())
    missing = [f"{g}.onnx" for g in GRAPHS if not (onnx_dir / f"{g}.onnx").is_file()]
    if missing:
        raise PipelineError(f"{onnx_dir}: incomplete export, {', '.join(missing)} missing; rerun make export")
    if meta.get("student") != student_fingerprint(folder):
        raise PipelineError(f"{onnx_dir}: exported from other weights than {folder} holds now; rerun make export")
    return meta


class OnnxStudent:
    """The student in ``folder`` (a ``best/``) exported to ``onnx_dir`` (default ``folder/onnx``), on
    onnxruntime's CPU provider with this process's share of the CPUs (:func:`pipeline.core.cpus.cpu_share`) unless
    ``threads`` is given."""

    def __init__(self, folder: Path, onnx_dir: Path | None = None, threads: int | None = None):
        folder = Path(folder)
        onnx_dir = Path(onnx_dir) if onnx_dir else folder / "onnx"
        self.meta = read_student_json(folder)
        require_files(folder, ("model.safetensors", "vocab.json"))
        self.onnx = read_onnx_json(folder, onnx_dir)
        self.vocab = Vocabulary.load(folder / "vocab.json")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_share()
        options.inter_op_num_threads = 1
        self.sessions = {g: ort.InferenceSession(str(onnx_dir / f"{g}.onnx"), options,
                                                 providers=["CPUExecutionProvider"]) for g in GRAPHS}
        self.step_inputs = [i.name for i in self.sessions["step"].get_inputs()]  # unused state is not an input

    def features(self, pixels: np.ndarray) -> np.ndarray:
        return self.sessions["encoder"].run(None, {"pixels": pixels})[0]

    def init_state(self, feats: np.ndarray) -> State:
        return dict(zip(self.onnx["state"], self.sessions["init_state"].run(None, {"features": feats})))

    def step(self, state: State, tokens: np.ndarray) -> tuple[np.ndarray, State]:
        feed = {"tokens": tokens, **state}
        logp, *updated = self.sessions["step"].run(None, {name: feed[name] for name in self.step_inputs})
        return logp, {**state, **dict(zip(self.onnx["updated"], updated))}

    def caption(self, images: Sequence[Image.Image], beam_size: int) -> list[str]:
        """One caption per RGB image: greedy for ``beam_size`` 1, else beam search (with the student's n-gram
        blocking, ``student.json`` ``no_repeat_ngram``)."""
        feats = self.features(to_pixels(images, **self.meta["image"]))
        vocab, max_length, n = self.vocab, self.meta["max_length"], self.meta.get("no_repeat_ngram", 0)
        if beam_size == 1:
            seqs = greedy_decode(self, feats, max_length, vocab.start_id, vocab.end_id, n)
        else:
            seqs = beam_search(self, feats, beam_size, max_length, vocab.start_id, vocab.end_id, n)
        return [vocab.decode(s) for s in seqs]


def block_repeats(logp: np.ndarray, history: np.ndarray, n: int) -> np.ndarray:
    """:func:`pipeline.students.beam.block_repeats` in numpy."""
    if n < 1 or history.shape[1] < n:
        return logp
    logp = logp.copy()
    for row, banned in enumerate(repeated_ngram_bans(history.tolist(), n)):
        logp[row, banned] = -np.inf
    return logp


def greedy_decode(decoder, feats: np.ndarray, max_length: int, start_id: int, end_id: int,
                  no_repeat_ngram: int = 0) -> list[list[int]]:
    """:func:`pipeline.students.beam.greedy_decode` in numpy."""
    state = decoder.init_state(feats)
    tokens = np.full(feats.shape[0], start_id, dtype=np.int64)
    done = np.zeros(feats.shape[0], dtype=bool)
    out = []
    for _ in range(max_length + 1):
        logp, state = decoder.step(state, tokens)
        if out:
            logp = block_repeats(logp, np.stack(out, 1), no_repeat_ngram)
        tokens = np.where(done, end_id, logp.argmax(-1))
        out.append(tokens)
        done |= tokens == end_id
        if done.all():
            break
    return [until_end(row, end_id) for row in np.stack(out, 1).tolist()]


def beam_search(decoder, feats: np.ndarray, beam_size: int, max_length: int, start_id: int,
                end_id: int, no_repeat_ngram: int = 0) -> list[list[int]]:
    """:func:`pipeline.students.beam.beam_search` in numpy: the best of ``beam_size`` beams by the sum of
    log-probabilities over length."""
    batch, k = feats.shape[0], beam_size
    state = {name: np.repeat(t, k, axis=0) for name, t in decoder.init_state(feats).items()}
    scores = np.full((batch, k), -np.inf, dtype=np.float32)
    scores[:, 0] = 0.0  # all beams start identical: keep one
    tokens = np.full(batch * k, start_id, dtype=np.int64)
    history = np.zeros((batch * k, 0), dtype=np.int64)
    lengths = np.zeros((batch, k), dtype=np.float32)
    done = np.zeros((batch, k), dtype=bool)
    for _ in range(max_length + 1):
        logp, state = decoder.step(state, tokens)
        vocab_size = logp.shape[-1]
        logp = block_repeats(logp, history, no_repeat_ngram).reshape(batch, k, vocab_size)
        finished = np.full_like(logp, -np.inf)
        finished[..., end_id] = 0.0  # a finished beam only extends with <end>, at no cost
        logp = np.where(done[..., None], finished, logp)
        total = (scores[..., None] + logp).reshape(batch, -1)
        flat = np.argsort(-total, axis=-1, kind="stable")[:, :k]  # topk: highest first, ties to the lower index
        scores = np.take_along_axis(total, flat, axis=-1)
        origin, tokens2d = flat // vocab_size, flat % vocab_size
        index = (origin + np.arange(batch)[:, None] * k).reshape(-1)
        state = {name: t[index] for name, t in state.items()}
        history = history[index]
        lengths, done = np.take_along_axis(lengths, origin, 1), np.take_along_axis(done, origin, 1)
        lengths = lengths + (~done).astype(np.float32)
        done = done | (tokens2d == end_id)
        tokens = tokens2d.reshape(-1)
        history = np.concatenate([history, tokens[:, None]], 1)
        if done.all():
            break
    best = (scores / np.maximum(lengths, 1)).argmax(-1)
    rows = history.reshape(batch, k, -1)[np.arange(batch), best]
    return [until_end(row, end_id) for row in rows.tolist()]
