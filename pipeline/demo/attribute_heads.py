"""Supervised attribute pretraining: a classifier per outfit attribute over an image backbone's features.

The demo's pretraining stand-ins (for ImageNet under the students' encoders, for CLIP under the tiny LLaVA's vision
tower) train a backbone this way on rendered images whose captions are disjoint from train/val/test, so that its
features carry what a photo shows, as a real pretrained encoder's do. The held-out accuracy per attribute is the
"probe": how much of each label a small model can read from the rendered images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from pipeline.evaluation.attributes import ATTRIBUTE_VALUES, caption_labels

log = logging.getLogger(__name__)


def attribute_targets(captions: Sequence[str]) -> torch.Tensor:
    """Class index of every attribute a caption states: ``[len(captions), len(ATTRIBUTE_VALUES)]``."""
    rows = []
    for caption in captions:
        labels = caption_labels(caption)
        rows.append([values.index(labels[a]) for a, values in ATTRIBUTE_VALUES.items()])
    return torch.tensor(rows, dtype=torch.long)


class AttributeHeads(nn.Module):
    """A linear classifier per attribute over a ``dim``-wide feature vector (``[B, dim]``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleList(nn.Linear(dim, len(values)) for values in ATTRIBUTE_VALUES.values())

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        x = self.norm(features)
        return [head(x) for head in self.heads]

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sum(nn.functional.cross_entropy(logits, targets[:, i]) for i, logits in enumerate(self(features))
                   ) / len(self.heads)

    @torch.no_grad()
    def correct(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Right answers per attribute (summed over the batch)."""
        return torch.stack([(logits.argmax(-1) == targets[:, i]).sum() for i, logits in enumerate(self(features))])


class AttentiveAttributeHeads(AttributeHeads):
    """Per attribute, a learnt query attends over ``dim``-wide tokens (``[B, T, dim]``) and a linear classifier reads
    what it gathered: the way a language model's words read image tokens, so the tokens learn to be read that way."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.queries = nn.Parameter(torch.randn(len(ATTRIBUTE_VALUES), dim) * dim ** -0.5)
        self.keys = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        x = self.norm(features)
        weights = torch.einsum("btd,ad->bat", self.keys(x), self.queries).softmax(-1)
        gathered = torch.einsum("bat,btd->bad", weights, x)
        return [head(gathered[:, i]) for i, head in enumerate(self.heads)]


def pretrain_on_attributes(pooled: Callable[[torch.Tensor], torch.Tensor], backbone: nn.Module, dim: int,
                           images: torch.Tensor, targets: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
                           seed: int, held_out: float = 0.1, desc: str = "pretrain",
                           heads: type[AttributeHeads] = AttributeHeads) -> dict[str, float]:
    """Train ``backbone`` (through ``pooled``: preprocessed images -> the features ``heads`` read, ``dim`` wide) and
    attribute ``heads`` on ``images`` (already preprocessed) with AdamW; returns the held-out accuracy per attribute
    (the last ``held_out`` share of the images is never trained on)."""
    torch.manual_seed(seed)
    heads = heads(dim)
    n_eval = max(1, int(len(images) * held_out))
    train, evaluation = slice(0, len(images) - n_eval), slice(len(images) - n_eval, len(images))
    params = [p for p in backbone.parameters() if p.requires_grad] + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    n_train = len(images) - n_eval
    steps = epochs * -(-n_train // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    backbone.train()
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        for _ in range(epochs):
            for idx in torch.randperm(n_train, generator=generator).split(batch_size):
                loss = heads.loss(pooled(images[train][idx]), targets[train][idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    backbone.eval()
    correct = torch.zeros(len(ATTRIBUTE_VALUES))
    with torch.no_grad():
        for idx in torch.arange(n_eval).split(256):
            correct += heads.correct(pooled(images[evaluation][idx]), targets[evaluation][idx])
    accuracy = {a: round(float(c) / n_eval, 4) for a, c in zip(ATTRIBUTE_VALUES, correct)}
    log.info("%s: held-out attribute accuracy %.3f (%d images)", desc, sum(accuracy.values()) / len(accuracy), n_eval)
    return accuracy
