"""The teacher's generation engines behind one interface (``distill.engine``): ``hf`` runs transformers ``generate``
in this process, ``vllm`` the vLLM engine in its worker process (:mod:`pipeline.teacher.vllm_engine`).

Both caption the same decoded images with the same prompt (the checkpoint's chat template) and seed sample j of an
image from (run seed, image id, j), so within an engine a caption depends on neither batch, shard nor resume. The two
engines draw samples with different generators: a sampled dataset depends on its engine (greedy ones agree).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from pipeline.core.config import Config
from pipeline.core.cpus import cpu_share
from pipeline.teacher.collator import build_prompt, eos_token_ids
from pipeline.teacher.generate import Generation, clean_caption, generate_captions, sample_seed
from pipeline.teacher.loading import (
    DTYPES,
    finetuned_teacher,
    load_generation_config,
    load_processor,
    load_teacher,
)
from pipeline.teacher.vllm_engine import EngineSettings, VllmEngine, served_checkpoint


class CaptionEngine(Protocol):
    name: str
    version: str

    def generate(self, images: Sequence, image_ids: Sequence[str], *, samples: Sequence[int], seed: int,
                 temperature: float, top_p: float, max_new_tokens: int) -> list[Generation]: ...

    def close(self) -> None: ...


class HfEngine:
    """transformers ``generate`` (:func:`pipeline.teacher.generate.generate_captions`)."""

    name = "hf"

    def __init__(self, model, processor):
        import transformers

        self.model, self.processor, self.version = model, processor, transformers.__version__

    def generate(self, images, image_ids, *, samples, seed, temperature, top_p, max_new_tokens):
        return generate_captions(self.model, self.processor, images, image_ids, seed=seed, temperature=temperature,
                                 top_p=top_p, max_new_tokens=max_new_tokens, samples=samples)

    def close(self) -> None:
        pass


class VllmCaptionEngine:
    """The vLLM worker serving the teacher, with the prompt the HF processor builds."""

    name = "vllm"

    def __init__(self, engine: VllmEngine, processor, eos_ids: Sequence[int] = ()):
        """``eos_ids``: the tokens that end an answer (:func:`eos_token_ids`; default the tokenizer's EOS)."""
        self.engine, self.processor, self.version = engine, processor, engine.version
        self.prompt = build_prompt(processor)
        self.eos_ids = list(eos_ids) or eos_token_ids(processor)

    def generate(self, images, image_ids, *, samples, seed, temperature, top_p, max_new_tokens):
        seeds = [sample_seed(seed, i, j) if temperature > 0 else None for i, j in zip(image_ids, samples)]
        outputs = self.engine.generate(images, [self.prompt] * len(images), seeds=seeds, temperature=temperature,
                                       top_p=top_p, max_tokens=max_new_tokens)
        return [Generation(clean_caption(o.text), self.caption_tokens(o.token_ids),
                           truncated=o.finish_reason == "length") for o in outputs]

    def caption_tokens(self, token_ids: Sequence[int]) -> int:
        """Tokens of a caption without the end token that stopped it (as :class:`HfEngine` counts them)."""
        return len(token_ids) - (len(token_ids) > 0 and token_ids[-1] in self.eos_ids)

    def close(self) -> None:
        self.engine.close()


def open_engine(cfg: Config, teacher_dir: Path, *, cpu: bool = False, threads: int | None = None) -> CaptionEngine:
    """The engine ``cfg.distill.engine`` serving the fine-tuned teacher of ``teacher_dir`` (over ``teacher.model``),
    on the GPU where there is one unless ``cpu`` (vLLM: the build installed decides); ``threads``: the vLLM worker's
    CPU threads (default: this process's share); close it when done."""
    t = cfg.teacher
    if cfg.distill.engine == "hf":
        import torch

        model_dir, adapter = finetuned_teacher(t.model, teacher_dir)
        model = load_teacher(model_dir, adapter, precision=t.precision, attn_implementation=t.attn_implementation,
                             device_map="auto" if torch.cuda.is_available() and not cpu else None, merge=True)
        return HfEngine(model, load_processor(adapter or model_dir))
    v = cfg.distill.vllm
    served = served_checkpoint(t.model, teacher_dir, precision=t.precision)
    settings = EngineSettings(model=str(served), dtype=DTYPES[t.precision] if v.dtype == "auto" else v.dtype,
                              max_model_len=v.max_model_len, max_num_seqs=v.max_num_seqs,
                              tensor_parallel_size=v.tensor_parallel_size,
                              gpu_memory_utilization=v.gpu_memory_utilization, cpu_kv_cache_gb=v.cpu_kv_cache_gb,
                              threads=threads or cpu_share())
    processor = load_processor(served)
    return VllmCaptionEngine(VllmEngine(settings), processor,
                             eos_token_ids(processor, load_generation_config(served)))


class EngineCaptioner:
    """A :class:`pipeline.students.runtime.Captioner` over an engine: greedy captions (temperature 0)."""

    def __init__(self, engine: CaptionEngine, *, max_new_tokens: int):
        self.engine, self.max_new_tokens = engine, max_new_tokens

    def caption(self, images: Sequence, beam_size: int) -> list[str]:
        """One greedy caption per image; ``beam_size`` is not used."""
        return [g.caption for g in self.engine.generate(images, [str(i) for i in range(len(images))],
                                                        samples=[0] * len(images), seed=0, temperature=0.0,
                                                        top_p=1.0, max_new_tokens=self.max_new_tokens)]
