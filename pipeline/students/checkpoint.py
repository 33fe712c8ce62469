"""A student checkpoint (``best/``, ``last/``): save it, describe it, load it back with no config.

``best/`` is self-describing (:mod:`pipeline.students.runtime` reads its ``student.json``): decoder and encoder
weights as safetensors, the vocabulary and every setting needed to rebuild them. ``load_student`` is what users
import to caption in Python; the training loop (:mod:`pipeline.students.train`) saves through here.
"""

from __future__ import annotations

import io
import json
import pickle
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from pipeline.core.archs import ARCHS
from pipeline.core.config import EncoderSettings, StudentsConfig
from pipeline.core.errors import PipelineError
from pipeline.core.rundir import atomic_write_bytes, atomic_write_json, publish_dir
from pipeline.students.beam import beam_search, greedy_decode
from pipeline.students.decoders import DECODER_SETTINGS, build_decoder
from pipeline.students.encoders import IMAGENET_MEAN, IMAGENET_STD, build_encoder
from pipeline.students.features import compute_device, decoder_input
from pipeline.students.runtime import FORMAT_VERSION, read_student_json, require_files, to_pixels
from pipeline.students.vocab import Vocabulary


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_weights(folder: Path, model: nn.Module, encoder: nn.Module | None) -> None:
    """``model.safetensors`` (the decoder) and, when given, ``encoder.safetensors`` in ``folder`` (atomic writes,
    readable like every other output)."""
    atomic_write_bytes(folder / "model.safetensors", save(_state(model)))
    if encoder is not None:
        atomic_write_bytes(folder / "encoder.safetensors", save(_state(encoder)))


def save_optimizer(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.pt`` in ``folder``; a failed write (a full disk) names the file."""
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    atomic_write_bytes(folder / "optimizer.pt", buffer.getvalue())


def load_resume_state(folder: Path, optimizer: torch.optim.Optimizer, device: torch.device | str
                      ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore ``optimizer.pt`` of a ``last/`` folder into ``optimizer``; its ``state.json`` and ``rng.json`` (None
    where absent). A damaged file is one line naming it."""
    path = folder / "optimizer.pt"
    try:
        optimizer.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        path = folder / "state.json"
        state = json.loads(path.read_text())
        path = folder / "rng.json"
        return state, json.loads(path.read_text()) if path.is_file() else None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError, KeyError) as exc:  # cut short
        if isinstance(exc, OSError) and exc.filename:  # not the content: a permission, a missing file
            raise
        reason = " ".join(str(exc).split())
        raise PipelineError(f"{path}: unreadable ({type(exc).__name__}: {reason}); rerun with --force to train "
                            "this student from the start") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; one line naming it when it is cut short or not safetensors."""
    try:
        return load_file(path)
    except SafetensorError as exc:
        raise PipelineError(f"{path}: not a readable safetensors file ({exc}); retrain or restore it") from None


def load_weights(folder: Path, model: nn.Module, encoder: nn.Module | None) -> None:
    """The weights :func:`save_weights` wrote, into ``model`` (and ``encoder``)."""
    _load_state(model, folder / "model.safetensors")
    if encoder is not None:
        _load_state(encoder, folder / "encoder.safetensors")


def rng_state() -> dict[str, Any]:
    """Every random generator a training step draws from (torch's CPU and CUDA generators: dropout, sampling;
    numpy's and Python's), as JSON for ``last/rng.json``: a resumed run draws what an uninterrupted one would. The
    data order needs none: each epoch's is drawn from its own generator seeded with (seed, epoch)."""
    state = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "python": [state[0], list(state[1]), state[2]]}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def describe_student(arch: str, cfg: StudentsConfig, *, feat_dim: int, vocab_size: int, seed: int,
                     encoder_finetuned: bool) -> dict[str, Any]:
    """``student.json``: everything :func:`load_student` needs to rebuild and run the student without a config."""
    settings = cfg.encoder
    return {"format_version": FORMAT_VERSION, "arch": arch, "feat_dim": feat_dim, "vocab_size": vocab_size,
            "decoder": cfg.model_dump(mode="json", include=set(DECODER_SETTINGS)),
            "encoder": {"name": ARCHS[arch].encoder, "settings": settings.model_dump(mode="json"),
                        "weights": "encoder.safetensors"},
            "encoder_finetuned": encoder_finetuned,
            "image": {"size": settings.image_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "vocabulary": "vocab.json", "max_length": cfg.max_length, "beam_size": cfg.beam_size,
            "no_repeat_ngram": cfg.no_repeat_ngram, "seed": seed}


def save_student(folder: Path, model: nn.Module, vocab: Vocabulary, meta: dict[str, Any],
                 encoder: nn.Module | None = None) -> None:
    """Decoder and encoder weights as safetensors, vocabulary and ``student.json``, published at once."""
    with publish_dir(folder) as tmp:
        save_weights(tmp, model, encoder)
        vocab.save(tmp / "vocab.json")
        atomic_write_json(tmp / "student.json", meta)


def encoder_skeleton(name: str, settings: EncoderSettings) -> nn.Module:
    """The encoder's architecture for ``settings`` with untrained weights, without its pretrained weights file (a
    checkpoint carries its own weights)."""
    return build_encoder(name, settings.model_copy(update={"pretrained": False}))


@dataclass
class Student:
    """A trained student in PyTorch: its encoder, decoder, vocabulary and description (``student.json``)."""

    encoder: nn.Module
    decoder: nn.Module
    vocab: Vocabulary
    meta: dict[str, Any]

    @torch.no_grad()
    def caption(self, images: Sequence[Image.Image], beam_size: int) -> list[str]:
        """One caption per RGB image: greedy for ``beam_size`` 1, else beam search (with the student's n-gram
        blocking, ``student.json`` ``no_repeat_ngram``)."""
        device = next(self.decoder.parameters()).device
        pixels = torch.from_numpy(to_pixels(images, **self.meta["image"])).to(device)
        feats = decoder_input(self.meta["arch"], self.encoder(pixels))
        vocab, max_length, n = self.vocab, self.meta["max_length"], self.meta.get("no_repeat_ngram", 0)
        if beam_size == 1:
            seqs = greedy_decode(self.decoder, feats, max_length, vocab.start_id, vocab.end_id, n)
        else:
            seqs = beam_search(self.decoder, feats, beam_size, max_length, vocab.start_id, vocab.end_id, n)
        return [vocab.decode(s) for s in seqs]


def _load_state(module: nn.Module, path: Path) -> None:
    try:
        module.load_state_dict(read_tensors(path))
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
        raise PipelineError(f"{path}: does not fit student.json: {str(exc).splitlines()[0]}") from None


def _settings(kind: type[BaseModel], meta: dict[str, Any], folder: Path, *keys: str) -> BaseModel:
    """``meta[keys...]`` validated as ``kind``; one line naming the student.json key when it does not fit."""
    value = meta
    for key in keys:
        value = value[key]
    try:
        return kind.model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join([*keys, *map(str, error["loc"])])
        raise PipelineError(f"{folder / 'student.json'}: {key}: {error['msg']}") from None


def load_decoder(folder: Path, device: torch.device | str | None = None
                 ) -> tuple[nn.Module, Vocabulary, dict[str, Any]]:
    """The decoder saved in ``folder`` (a ``best/``) rebuilt from its ``student.json`` alone (on ``device``, default
    the compute device, in eval mode), its vocabulary and its description."""
    meta = read_student_json(folder)
    require_files(folder, ("model.safetensors", "vocab.json"))
    vocab = Vocabulary.load(folder / "vocab.json")
    if len(vocab) != meta["vocab_size"]:
        raise PipelineError(f"{folder / 'vocab.json'}: {len(vocab)} words, student.json says {meta['vocab_size']}")
    decoder = build_decoder(meta["arch"], meta["feat_dim"], meta["vocab_size"],
                            _settings(StudentsConfig, meta, folder, "decoder"))
    _load_state(decoder, folder / "model.safetensors")
    return decoder.to(device or compute_device()).eval(), vocab, meta


def load_student(folder: Path, device: torch.device | str | None = None) -> Student:
    """The student saved in ``folder`` (a ``best/``): decoder and encoder rebuilt from ``student.json`` alone, on
    ``device`` (default: the GPU when there is one)."""
    decoder, vocab, meta = load_decoder(folder, device)
    require_files(folder, ("encoder.safetensors",))
    encoder = encoder_skeleton(meta["encoder"]["name"], _settings(EncoderSettings, meta, folder, "encoder", "settings"))
    _load_state(encoder, folder / "encoder.safetensors")
    return Student(encoder.to(device or compute_device()).eval(), decoder, vocab, meta)


def record_test_results(folder: Path, *, test_metrics: dict[str, Any], caption_source: dict[str, Any],
                        training_data: dict[str, Any] | None = None) -> dict:
    """Add what scoring found out (test metrics, where the training captions came from, what the images were:
    ``training_data``, e.g. ``{"name", "synthetic", "source"}``) to ``student.json``."""
    meta = {**read_student_json(folder), "caption_source": caption_source, "test_metrics": test_metrics,
            **({"training_data": training_data} if training_data else {})}
    atomic_write_json(folder / "student.json", meta)
    return meta
