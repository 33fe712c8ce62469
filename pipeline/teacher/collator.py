"""Prompts and the fine-tuning collator for any image-text-to-text teacher: loss on the answer and its end token only.

Training and generation share one prompt, made by the checkpoint's own chat template (``USER: <image>\\n<instruction>
ASSISTANT:`` for llava-1.5-hf, ChatML for Qwen2-VL, ...). The prompts of a batch go through the processor in one call
(it expands each image into its image tokens, which for LLaVA-NeXT, Qwen2-VL and Idefics3 depend on the image's
size, and returns the family's own image inputs: ``image_sizes``, ``image_grid_thw``, ``pixel_attention_mask``, ...).
Each row's answer, as the template renders it up to its first end token, is tokenised separately and appended, so the
boundary between prompt and answer is exact and image tokens are never cut; every processor output reaches the
model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from pipeline.data.formats import INSTRUCTION

IGNORE_INDEX = -100
# per-token outputs the collator extends over the appended answer, and the value of an answer token in each
ANSWER_FILL = {"attention_mask": 1, "token_type_ids": 0, "mm_token_type_ids": 0}


class TooLongError(ValueError):
    pass


def messages(instruction: str = INSTRUCTION, answer: str | None = None) -> list[dict]:
    """One user turn (an image, then the instruction) and, when given, the assistant's answer."""
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turns


def build_prompt(processor, instruction: str = INSTRUCTION) -> str:
    """The checkpoint's chat template rendered for one image and ``instruction``, ending where the answer begins."""
    return processor.apply_chat_template(messages(instruction), add_generation_prompt=True, tokenize=False)


def text_kwargs(processor, text: str) -> dict[str, bool]:
    """Tokeniser arguments for ``text``: no BOS added when the template already wrote one (Idefics3-8B's template
    starts with ``<|begin_of_text|>``, which its tokenizer would add again)."""
    bos = processor.tokenizer.bos_token
    return {"add_special_tokens": not (bos and text.startswith(bos))}


def encode_prompts(processor, prompt: str, images: Sequence, **kwargs):
    """One processor call: ``prompt`` once per image, each image in a list of its own (Gemma 3's processor reads a
    flat list as all of one prompt's images), as tensors; the processor's own ``labels`` (PaliGemma labels the
    prompt) dropped, as labels are the collator's to make. ``kwargs``: ``padding``, ``suffix``, ..."""
    enc = processor(images=[[im] for im in images], text=[prompt] * len(images), return_tensors="pt",
                    **text_kwargs(processor, prompt), **kwargs)
    enc.pop("labels", None)
    return enc


def eos_token_ids(processor, generation_config=None) -> list[int]:
    """The tokens that end an answer: the generation config's (an id or a list; Qwen2-VL has two) then the
    tokenizer's."""
    ids = getattr(generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    eos = processor.tokenizer.eos_token_id
    return ids + ([eos] if eos is not None and eos not in ids else [])


def answer_ids(processor, caption: str, eos_ids: Sequence[int], instruction: str = INSTRUCTION) -> list[int]:
    """Token ids of the answer as the model must produce it: what the chat template renders after the prompt, up to
    and including its first end token (what the template writes after it, ``\\n`` or a space, gets no label); a
    template that writes no end token (llava-1.5-hf) gets the answer without its trailing space, then EOS. A template
    whose assistant turn does not start with its own generation prompt (llava-onevision-hf renders
    ``<|im_start|>assistant \\n`` after ``<|im_start|>assistant\\n``) gives what it renders from the caption on: the
    model is prompted with the generation prompt, so that is what it must write after it."""
    caption = caption.strip()
    prompt = build_prompt(processor, instruction)
    full = processor.apply_chat_template(messages(instruction, caption), tokenize=False)
    if full.startswith(prompt):
        suffix = full[len(prompt):]
    elif caption and caption in full:
        suffix = full[full.rindex(caption):]
    else:
        raise ValueError(f"the chat template's generation prompt {prompt[-40:]!r} is not a prefix of the rendered "
                         "conversation, nor does it render the caption verbatim; this template cannot be used for "
                         "answer-only training")
    tok = processor.tokenizer
    ids = tok(suffix, add_special_tokens=False)["input_ids"]
    ends = [j for j, i in enumerate(ids) if i in eos_ids]
    if ends:
        return ids[: ends[0] + 1]
    return tok(suffix.rstrip(), add_special_tokens=False)["input_ids"] + [eos_ids[0]]


class PromptLengths:
    """Tokens of the prompt with one image's tokens expanded, per image size (the count depends on the size for
    LLaVA-NeXT, Qwen2-VL and Idefics3, on nothing else): computed once per distinct size."""

    def __init__(self, processor, instruction: str = INSTRUCTION):
        self.processor, self.prompt = processor, build_prompt(processor, instruction)
        # the ids the processor names as the image's: Gemma 3's image_token_id is its begin-of-image marker and its
        # image_token_ids the soft tokens; Pixtral's and InternVL's image_token_ids add row breaks / start / end
        ids = [getattr(processor, "image_token_id", None), *(getattr(processor, "image_token_ids", None) or [])]
        self.image_token_candidates = [i for i in dict.fromkeys(ids) if isinstance(i, int)]
        self.cache: dict[tuple[int, int], int] = {}
        self.image_tokens: dict[tuple[int, int], int] = {}  # the image tokens among them, per size

    def __call__(self, size: tuple[int, int]) -> int:
        """Prompt tokens for an image of ``size`` (width, height)."""
        if size not in self.cache:
            enc = encode_prompts(self.processor, self.prompt, [Image.new("RGB", size)])
            ids = enc["input_ids"][0]
            self.cache[size] = int(ids.shape[0])
            if self.image_token_candidates:  # the tokens that carry the image: the most numerous of those ids
                self.image_tokens[size] = max(int((ids == i).sum()) for i in self.image_token_candidates)
        return self.cache[size]


def prompt_length(processor, image) -> int:
    """Number of tokens of the prompt with ``image``'s tokens expanded."""
    return PromptLengths(processor)(image.size)


def answer_fill(processor, prompt: str) -> dict[str, int]:
    """The value of each per-token output over an appended answer: :data:`ANSWER_FILL`, except the values the
    processor itself gives an answer where it takes one as ``suffix`` (PaliGemma's: its prefix-LM attends
    bidirectionally over the tokens of type 0, so an answer typed 0 would see its own future tokens)."""
    import inspect

    fill = dict(ANSWER_FILL)
    if "suffix" in inspect.signature(processor.__call__).parameters:
        enc = encode_prompts(processor, prompt, [Image.new("RGB", (32, 32))], suffix=["a"])
        fill.update({k: int(enc[k][0, -1]) for k in fill if k in enc})
    return fill


class CaptionCollator:
    """Batch of ``{"image": PIL.Image, "caption": str, "image_id": str}`` -> model inputs with masked labels: the
    processor's outputs for the prompts (all of them), each per-token one extended over the answer."""

    def __init__(self, processor, max_length: int, instruction: str = INSTRUCTION,
                 eos_ids: Sequence[int] | None = None):
        self.processor = processor
        self.max_length = max_length
        self.instruction = instruction
        self.prompt = build_prompt(processor, instruction)
        self.eos_ids = list(eos_ids) if eos_ids else eos_token_ids(processor)
        self.fill = answer_fill(processor, self.prompt)

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        tok = self.processor.tokenizer
        enc = encode_prompts(self.processor, self.prompt, [b["image"] for b in batch], padding=True)
        shape = enc["input_ids"].shape
        per_token = [k for k, v in enc.items() if k != "input_ids" and getattr(v, "shape", None) == shape]
        unknown = set(per_token) - set(self.fill)
        if unknown:
            raise ValueError(f"the processor returns per-token outputs {sorted(unknown)} the collator cannot extend "
                             "over the answer")
        rows, labels = [], []
        for i, b in enumerate(batch):
            keep = enc["attention_mask"][i].bool()
            prompt = {k: enc[k][i][keep].tolist() for k in ["input_ids", *per_token]}
            answer = answer_ids(self.processor, b["caption"], self.eos_ids, self.instruction)
            n = len(prompt["input_ids"]) + len(answer)
            if n > self.max_length:
                raise TooLongError(f"sample {b.get('image_id')!r}: {len(prompt['input_ids'])} prompt (with image) + "
                                   f"{len(answer)} answer tokens exceed teacher.train.max_length={self.max_length}")
            prompt["input_ids"] += answer
            for k in per_token:
                prompt[k] += [self.fill[k]] * len(answer)
            rows.append(prompt)
            labels.append([IGNORE_INDEX] * (n - len(answer)) + answer)
        width = max(len(r["input_ids"]) for r in rows)
        pad = {"input_ids": tok.pad_token_id, **dict.fromkeys(per_token, 0)}
        out = {k: torch.full((len(rows), width), pad[k], dtype=enc[k].dtype) for k in pad}
        out["labels"] = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, labels)):
            for k, v in r.items():
                out[k][i, : len(v)] = torch.tensor(v, dtype=out[k].dtype)
            out["labels"][i, : len(lab)] = torch.tensor(lab)
        for k, v in enc.items():  # pixel_values, image_sizes, image_grid_thw, pixel_attention_mask, ...
            out.setdefault(k, v)
        return out
