"""Attribute heads of the pretraining stand-ins: attentive heads find a label wherever among the tokens it is."""

import torch
from torch import nn

from pipeline.demo.attribute_heads import AttentiveAttributeHeads, AttributeHeads, pretrain_on_attributes
from pipeline.evaluation.attributes import ATTRIBUTE_VALUES


def _tokens_with_labels_at_random_places(n: int, spare: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and attribute, one token (a new place per image) says "attribute a" and carries its class; the other
    tokens are noise. Reading it needs a query that finds the token, as a language model's word finds a patch."""
    g = torch.Generator().manual_seed(seed)
    sizes = [len(values) for values in ATTRIBUTE_VALUES.values()]
    dim = len(sizes) + max(sizes)
    targets = torch.stack([torch.randint(0, size, (n,), generator=g) for size in sizes], dim=1)
    x = torch.randn(n, len(sizes) + spare, dim, generator=g) * 0.1
    for i in range(n):
        places = torch.randperm(x.shape[1], generator=g)[: len(sizes)]
        for a, place in enumerate(places.tolist()):
            x[i, place, a] += 3.0
            x[i, place, len(sizes) + targets[i, a]] += 3.0
    return x, targets


def _held_out_macro(heads: type[AttributeHeads], flat: bool) -> float:
    x, targets = _tokens_with_labels_at_random_places(1200)
    dim = x.shape[-1] * (x.shape[1] if flat else 1)
    accuracy = pretrain_on_attributes((lambda t: t.flatten(1)) if flat else (lambda t: t), nn.Identity(), dim, x,
                                      targets, epochs=12, batch_size=64, lr=1e-2, seed=0, heads=heads)
    return sum(accuracy.values()) / len(accuracy)


def test_attentive_heads_read_a_label_wherever_its_token_is_and_linear_heads_cannot():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        attentive, linear = _held_out_macro(AttentiveAttributeHeads, False), _held_out_macro(AttributeHeads, True)
    finally:
        torch.set_num_threads(threads)
    assert attentive > 0.9, attentive
    assert linear < attentive - 0.3, (linear, attentive)
