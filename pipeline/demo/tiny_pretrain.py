"""A stand-in for the pretraining a real LLaVA arrives with, for the demo's tiny LLaVA.

A downloaded llava-1.5 has a CLIP vision tower trained on image-text pairs and a language model that LLaVA's own
pretraining taught to talk about what the projected image tokens show. The demo's tiny LLaVA starts from random
weights, so without a stand-in its `finetune` learns the DeepFashion caption style but not to look. Two steps, on
rendered images whose captions are in no split (``data.pretraining``):

1. vision: the vision tower and the projector learn the outfit attributes from the image tokens the language model
   will see, read the way the language model will read them: per attribute, a learnt query attends over the tokens
   and a linear head classifies what it gathered (linear heads over all tokens at once taught the tokens a code that
   the tiny language model read worse: 0.907 vs 0.934 test attributes after `finetune`, see docs/results.md);
2. language: the language model (the image side frozen) learns to answer "List the outfit attributes." with an
   attribute list ("gender female; sleeve length long; ...") in a new random order for every image and epoch, so
   that every attribute must be read from the image wherever it comes in the answer (DeepFashion's prose states them
   in many orders) — a style unlike DeepFashion's prose, which `finetune` still has to learn.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from PIL import Image
from tqdm import tqdm

from pipeline.core.config import TinyPretraining
from pipeline.demo.attribute_heads import AttentiveAttributeHeads, attribute_targets, pretrain_on_attributes
from pipeline.evaluation.attributes import ABSENT, ATTRIBUTES, caption_labels
from pipeline.teacher.collator import CaptionCollator

log = logging.getLogger(__name__)
QUESTION = "List the outfit attributes."
# in the tiny LLaVA's cache key: a change rebuilds it
RECIPE = "vision: a query per attribute attends over the image tokens; answers: attribute list, a new random order " \
         "per image and epoch"


def attribute_list(caption: str, order: Sequence[int] | None = None) -> str:
    """The pretraining answer for an image: the attributes its caption states, as a list (in ``order``: indices into
    ATTRIBUTES; default: ATTRIBUTES' order)."""
    labels = list(caption_labels(caption).items())
    stated = [labels[i] for i in (order if order is not None else range(len(labels)))]
    return "; ".join(f"{ATTRIBUTES[a]} {v}" for a, v in stated if v != ABSENT) + "."


def read_attribute_list(text: str) -> dict[str, str]:
    """The labels an attribute-list answer states (the inverse of :func:`attribute_list`; ``ABSENT`` elsewhere)."""
    by_label = sorted(((label, a) for a, label in ATTRIBUTES.items()), key=lambda item: -len(item[0]))
    labels = dict.fromkeys(ATTRIBUTES, ABSENT)
    for part in text.strip().rstrip(".").split(";"):
        part = part.strip()
        for label, attribute in by_label:
            if part.startswith(label + " "):
                labels[attribute] = part[len(label) + 1:].strip()
                break
    return labels


def _image_tokens(model, cfg) -> callable:
    """Pixel values -> the projected image tokens the language model reads, ``[B, tokens, hidden]``."""
    def tokens(pixel_values: torch.Tensor) -> torch.Tensor:
        out = model.get_image_features(pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                                       vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return torch.stack(list(out.pooler_output))
    return tokens


def pretrain_tiny_llava(model, processor, images: Sequence[Image.Image], captions: Sequence[str],
                        cfg: TinyPretraining, seed: int) -> dict:
    """Run both steps on ``model`` in place; returns the vision step's held-out accuracy per attribute and the
    language step's last loss."""
    torch.manual_seed(seed)
    figures: dict = {"images": len(images)}
    if cfg.vision_epochs:
        pixel_values = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
        tokens = _image_tokens(model, model.config)
        dim = tokens(pixel_values[:1]).shape[-1]
        figures["vision_held_out_accuracy"] = pretrain_on_attributes(
            tokens, model, dim, pixel_values, attribute_targets(captions), epochs=cfg.vision_epochs,
            batch_size=cfg.batch_size * 2, lr=cfg.vision_learning_rate, seed=seed, desc="pretrain vision tower",
            heads=AttentiveAttributeHeads)
    if cfg.language_epochs:
        figures["language_last_loss"] = _language_step(model, processor, images, captions, cfg, seed)
    return figures


def _language_step(model, processor, images: Sequence[Image.Image], captions: Sequence[str], cfg: TinyPretraining,
                   seed: int) -> float:
    collate = CaptionCollator(processor, max_length=1024, instruction=QUESTION)
    # the image side keeps what the vision step taught it; the language model learns to read it
    language = [p for n, p in model.named_parameters() if "vision_tower" not in n and "multi_modal_projector" not in n]
    optimizer = torch.optim.AdamW(language, lr=cfg.language_learning_rate, weight_decay=0.0)
    batches = -(-len(images) // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.language_learning_rate,
                                                   total_steps=cfg.language_epochs * batches, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    with tqdm(total=cfg.language_epochs * batches, desc="pretrain language model", unit="step") as bar:
        for _ in range(cfg.language_epochs):
            for idx in torch.randperm(len(images), generator=generator).split(cfg.batch_size):
                # a new attribute order per image and epoch: the answer at any position must come from the image
                orders = [torch.randperm(len(ATTRIBUTES), generator=generator).tolist() for _ in idx]
                batch = collate([{"image": images[i], "caption": attribute_list(captions[i], order), "image_id": str(i)}
                                 for i, order in zip(idx.tolist(), orders)])
                loss = model(**batch).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(language, 1.0)
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    log.info("tiny LLaVA pretraining: language loss %.3f after %d epochs", loss.item(), cfg.language_epochs)
    return round(loss.item(), 4)
