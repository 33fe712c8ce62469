"""Batched caption generation with per-sample seeds: a caption depends on (seed, image id, sample), not on the batch.

HF ``generate`` draws every row of a batch from one global RNG, so a sample would change with batch composition,
sharding or resume. :class:`PerRowSampler` instead applies temperature and top-p itself and draws each row from its
own ``torch.Generator`` seeded from (run seed, image id, sample number); ``generate`` then runs greedily over the
one-hot result and keeps doing what it does well (KV cache, stopping, padding).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from pipeline.teacher.collator import build_prompt, encode_prompts, eos_token_ids


def image_seed(seed: int, image_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{image_id}".encode()).digest()[:8], "big") & (2**63 - 1)


def sample_seed(seed: int, image_id: str, sample: int) -> int:
    """The seed of sample ``sample`` of an image: sample 0's is :func:`image_seed` (one-sample datasets keep theirs)."""
    key = image_id if sample == 0 else f"{image_id}\0{sample}"
    return image_seed(seed, key)


class PerRowSampler(LogitsProcessor):
    """Temperature + top-p sampling with one generator per row; returns logits that select the drawn token."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > self.top_p  # keep the smallest prefix reaching top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        # inverse-CDF sampling: one uniform draw per row from that row's generator, then one vectorised search
        u = torch.stack([torch.rand((), generator=g) for g in self.generators])
        cdf = probs.cumsum(-1)
        chosen = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=probs.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, chosen.to(scores.device), 0.0)


@dataclass
class Generation:
    caption: str
    num_tokens: int
    truncated: bool  # stopped by max_new_tokens, not by the end-of-sequence token


def clean_caption(text: str) -> str:
    """The caption without surrounding whitespace, inner whitespace collapsed."""
    return " ".join(text.split())


@torch.inference_mode()
def generate_captions(model, processor, images: Sequence, image_ids: Sequence[str], *, seed: int,
                      temperature: float, top_p: float, max_new_tokens: int,
                      samples: Sequence[int] | None = None) -> list[Generation]:
    """One caption per image; greedy at ``temperature == 0``, otherwise sampling row i with the seed of sample
    ``samples[i]`` (default 0) of ``image_ids[i]`` (:func:`sample_seed`). The prompt is the checkpoint's chat
    template; every processor output goes to the model (floating ones in the model's dtype); a caption ends at any
    of the model's end tokens and is decoded from the new tokens only."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    prompt = build_prompt(processor)
    enc = encode_prompts(processor, prompt, images, padding=True)
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    enc = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in enc.items()}
    processors = LogitsProcessorList()
    if temperature > 0:
        samples = samples or [0] * len(image_ids)
        processors.append(PerRowSampler([sample_seed(seed, i, j) for i, j in zip(image_ids, samples)], temperature,
                                        top_p))
    eos = eos_token_ids(processor, model.generation_config)
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, logits_processor=processors,
                         eos_token_id=eos, pad_token_id=tok.pad_token_id, num_beams=1,
                         temperature=None, top_p=None, top_k=None)
    new = out[:, enc["input_ids"].shape[1]:].cpu()
    ends = torch.isin(new, torch.tensor(eos))
    results = []
    for row, end in zip(new, ends):
        ended = end.nonzero()
        length = int(ended[0]) if len(ended) else len(row)
        text = tok.decode(row[:length], skip_special_tokens=True)
        results.append(Generation(clean_caption(text), length, truncated=not len(ended)))
    return results
