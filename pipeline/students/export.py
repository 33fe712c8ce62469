"""ONNX export of a student (``make export``): ``<best>/onnx/`` for :class:`pipeline.students.onnx_runtime.OnnxStudent`.

Three graphs, exported with ``torch.onnx.export(dynamo=True)``: the encoder with the architecture's decoder-input
step (``features.decoder_input``: resnet101_gru's mean over the grid), the decoder's ``init_state`` and one decoder
``step``. Every graph takes any batch size (beam search runs batch x beams rows); state that grows by one position
per step (the self-attention keys and values of the positions decoded so far) has a dynamic length axis. The
export is checked before it is published: onnxruntime must give PyTorch's log-probabilities on a random batch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.core.rundir import atomic_write_json, publish_dir
from pipeline.students.checkpoint import load_student
from pipeline.students.decoders import State
from pipeline.students.features import decoder_input
from pipeline.students.onnx_runtime import GRAPHS, ONNX_FORMAT, OnnxStudent, student_fingerprint

log = logging.getLogger(__name__)
CHECK_TOLERANCE = 1e-3  # largest |log p| difference between onnxruntime and PyTorch the check accepts


class _Encoder(nn.Module):
    def __init__(self, encoder: nn.Module, arch: str):
        super().__init__()
        self.encoder, self.arch = encoder, arch

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return decoder_input(self.arch, self.encoder(pixels))


class _InitState(nn.Module):
    def __init__(self, decoder: nn.Module, names: list[str]):
        super().__init__()
        self.decoder, self.names = decoder, names

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = self.decoder.init_state(features)
        return tuple(state[n] for n in self.names)


class _Step(nn.Module):
    def __init__(self, decoder: nn.Module, names: list[str], updated: list[str]):
        super().__init__()
        self.decoder, self.names, self.updated = decoder, names, updated

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logp, new = self.decoder.step(dict(zip(self.names, state)), tokens)
        return (logp, *(new[n] for n in self.updated))


def _export(module: nn.Module, args: tuple, path: Path, *, input_names: list[str], output_names: list[str],
            dynamic_shapes: tuple) -> None:
    torch.onnx.export(module.eval(), args, str(path), dynamo=True, input_names=input_names, output_names=output_names,
                      dynamic_shapes=dynamic_shapes, external_data=False, verbose=False)


def _state_after(decoder: nn.Module, feats: torch.Tensor, steps: int) -> State:
    state = decoder.init_state(feats)
    for _ in range(steps):
        _, state = decoder.step(state, torch.full((feats.shape[0],), 3, dtype=torch.long))
    return state


@torch.no_grad()
def export_onnx(folder: Path, *, batch: int = 2) -> Path:
    """Export the student in ``folder`` (a ``best/``) to ``folder/onnx``, check it against PyTorch, return the path."""
    folder = Path(folder)
    student = load_student(folder, device="cpu")
    encoder, decoder = _Encoder(student.encoder, student.meta["arch"]).eval(), student.decoder
    size = student.meta["image"]["size"]
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    feats = encoder(pixels)
    # the state two steps in: a growing axis then has length 2, which the exporter does not fix to a constant
    state = _state_after(decoder, feats, 2)
    names = list(state)
    _, new = decoder.step(state, torch.full((batch,), 3, dtype=torch.long))
    updated = [n for n in names if new[n] is not state[n]]
    growing = [n for n in names if new[n].shape[1:] != state[n].shape[1:]]
    rows = torch.export.Dim("rows")
    with publish_dir(folder / "onnx") as tmp:
        _export(encoder, (pixels,), tmp / "encoder.onnx", input_names=["pixels"], output_names=["features"],
                dynamic_shapes=({0: rows},))
        _export(_InitState(decoder, names), (feats,), tmp / "init_state.onnx", input_names=["features"],
                output_names=names, dynamic_shapes=({0: rows},))
        length = torch.export.Dim("length")
        state_shapes = tuple({0: rows, 1: length} if n in growing else {0: rows} for n in names)
        _export(_Step(decoder, names, updated), (torch.full((batch,), 3, dtype=torch.long), *state.values()),
                tmp / "step.onnx", input_names=["tokens", *names],
                output_names=["logp", *(f"new_{n}" for n in updated)], dynamic_shapes=({0: rows}, state_shapes))
        atomic_write_json(tmp / "onnx.json", {"format_version": ONNX_FORMAT, "graphs": list(GRAPHS), "state": names,
                                              "updated": updated, "growing": growing,
                                              "student": student_fingerprint(folder), "torch": torch.__version__})
        check_export(folder, tmp, encoder, decoder)
    log.info("exported %s to %s", folder, folder / "onnx")
    return folder / "onnx"


@torch.no_grad()
def check_export(folder: Path, onnx_dir: Path, encoder: nn.Module, decoder: nn.Module, rows: int = 3,
                 steps: int = 4) -> float:
    """Largest |log p| difference between onnxruntime (graphs in ``onnx_dir``) and PyTorch over ``steps`` decoding
    steps of ``rows`` random images; a :class:`PipelineError` above ``CHECK_TOLERANCE``."""
    onnx = OnnxStudent(folder, onnx_dir)
    size = onnx.meta["image"]["size"]
    pixels = np.random.default_rng(1).standard_normal((rows, 3, size, size), dtype=np.float32)
    state, ort_state = decoder.init_state(encoder(torch.from_numpy(pixels))), onnx.init_state(onnx.features(pixels))
    tokens = torch.full((rows,), 1, dtype=torch.long)
    worst = 0.0
    for _ in range(steps):
        logp, state = decoder.step(state, tokens)
        ort_logp, ort_state = onnx.step(ort_state, tokens.numpy())
        worst = max(worst, float(np.abs(ort_logp - logp.numpy()).max()))
        tokens = logp.argmax(-1)
    if not worst <= CHECK_TOLERANCE:
        raise PipelineError(f"{onnx_dir}: onnxruntime's log-probabilities differ from PyTorch's by {worst:.2g} "
                            f"(> {CHECK_TOLERANCE}); the export is not published")
    log.info("onnxruntime matches PyTorch: largest log-probability difference %.2g", worst)
    return worst
