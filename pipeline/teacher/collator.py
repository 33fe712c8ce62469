"""Prompt building and the fine-tuning collator: loss on the caption and its end-of-sequence token only.

Training and generation share one prompt string, made by the checkpoint's own chat template
(``USER: <image>\\n<instruction> ASSISTANT:`` for llava-1.5-hf). The prompt goes through the processor (which
expands ``<image>`` into the vision tower's patch count); the answer is tokenised separately and appended, so the
boundary between prompt and answer is exact and the image tokens are never cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.data.formats import INSTRUCTION

IGNORE_INDEX = -100


def build_prompt(processor, instruction: str = INSTRUCTION) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: <image>\n{instruction} ASSISTANT:"


def answer_ids(processor, caption: str) -> list[int]:
    """Token ids of the answer as the model must produce it: `` <caption>`` then EOS."""
    tok = processor.tokenizer
    return tok(" " + caption.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def prompt_length(processor, image) -> int:
    """Number of tokens of the prompt with its image tokens expanded."""
    return int(processor(images=[image], text=[build_prompt(processor)], return_tensors="pt")["input_ids"].shape[1])


class TooLongError(ValueError):
    pass


class CaptionCollator:
    """Batch of ``{"image": PIL.Image, "caption": str, "image_id": str}`` -> model inputs with masked labels."""

    def __init__(self, processor, max_length: int, instruction: str = INSTRUCTION):
        self.processor = processor
        self.max_length = max_length
        self.prompt = build_prompt(processor, instruction)

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        tok = self.processor.tokenizer
        enc = self.processor(images=[b["image"] for b in batch], text=[self.prompt] * len(batch),
                             return_tensors="pt", padding=True)
        prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]
        rows, labels = [], []
        for i, b in enumerate(batch):
            p = prompt_ids[i][prompt_mask[i].bool()].tolist()
            a = answer_ids(self.processor, b["caption"])
            if len(p) + len(a) > self.max_length:
                raise TooLongError(f"sample {b.get('image_id')!r}: {len(p)} prompt + {len(a)} answer tokens exceed "
                                   f"teacher.train.max_length={self.max_length}")
            rows.append(p + a)
            labels.append([IGNORE_INDEX] * len(p) + a)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        label_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, labels)):
            input_ids[i, : len(r)] = torch.tensor(r)
            label_t[i, : len(lab)] = torch.tensor(lab)
            attention[i, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": label_t,
                "pixel_values": enc["pixel_values"]}
