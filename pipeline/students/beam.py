"""Batched greedy decoding, beam search and sampling over any decoder with ``init_state`` / ``step`` (see
decoders.py). ``no_repeat_ngram`` n > 0 blocks every token that would repeat an n-gram the caption already holds
(:func:`pipeline.students.runtime.repeated_ngram_bans`)."""

from __future__ import annotations

import torch

from pipeline.students.decoders import State
from pipeline.students.runtime import repeated_ngram_bans, until_end


def _repeat(state: State, k: int) -> State:
    return {name: t.repeat_interleave(k, dim=0) for name, t in state.items()}


def _select(state: State, index: torch.Tensor) -> State:
    return {name: t.index_select(0, index) for name, t in state.items()}


def block_repeats(logp: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """``logp`` [rows, vocab] with -inf at every token that would repeat an ``n``-gram of its row of ``history``."""
    if n < 1 or history.shape[1] < n:
        return logp
    bans = repeated_ngram_bans(history.tolist(), n)
    rows = [r for r, banned in enumerate(bans) for _ in banned]
    if not rows:
        return logp
    return logp.index_put((torch.tensor(rows, device=logp.device),
                           torch.tensor([t for banned in bans for t in banned], device=logp.device)),
                          torch.tensor(float("-inf"), device=logp.device, dtype=logp.dtype))


@torch.no_grad()
def greedy_decode(decoder, feats: torch.Tensor, max_length: int, start_id: int, end_id: int,
                  no_repeat_ngram: int = 0) -> list[list[int]]:
    state = decoder.init_state(feats)
    tokens = torch.full((feats.shape[0],), start_id, dtype=torch.long, device=feats.device)
    done = torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
    out = []
    for _ in range(max_length + 1):
        logp, state = decoder.step(state, tokens)
        if out:
            logp = block_repeats(logp, torch.stack(out, 1), no_repeat_ngram)
        tokens = logp.argmax(-1).masked_fill(done, end_id)
        out.append(tokens)
        done |= tokens == end_id
        if done.all():
            break
    return [until_end(row, end_id) for row in torch.stack(out, 1).tolist()]


@torch.no_grad()
def beam_search(decoder, feats: torch.Tensor, beam_size: int, max_length: int, start_id: int,
                end_id: int, no_repeat_ngram: int = 0) -> list[list[int]]:
    """Best sequence per image (sum of log-probabilities over length) among ``beam_size`` beams. An image whose beams
    have all ended leaves the batch (its result cannot change any more), so a few long captions do not keep every
    image's beams stepping to ``max_length``."""
    batch, k, device = feats.shape[0], beam_size, feats.device
    state = _repeat(decoder.init_state(feats), k)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one
    tokens = torch.full((batch * k,), start_id, dtype=torch.long, device=device)
    history = torch.zeros(batch * k, 0, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, k, device=device)
    done = torch.zeros(batch, k, dtype=torch.bool, device=device)
    images = torch.arange(batch, device=device)  # which image each row of the shrinking batch is
    results: list[list[int]] = [[] for _ in range(batch)]

    def finish(rows: torch.Tensor) -> None:
        best = (scores[rows] / lengths[rows].clamp(min=1)).argmax(-1)
        picked = history.view(len(scores), k, -1)[rows, best]
        for image, seq in zip(images[rows].tolist(), picked.tolist()):
            results[image] = until_end(seq, end_id)

    for _ in range(max_length + 1):
        logp, state = decoder.step(state, tokens)
        logp = block_repeats(logp, history, no_repeat_ngram).view(len(scores), k, -1)
        finished = torch.full_like(logp, float("-inf"))
        finished[..., end_id] = 0.0  # a finished beam only extends with <end>, at no cost
        logp = torch.where(done[..., None], finished, logp)
        total = (scores[..., None] + logp).view(len(scores), -1)
        scores, flat = total.topk(k, dim=-1)
        origin, tokens2d = flat // logp.shape[-1], flat % logp.shape[-1]
        index = (origin + torch.arange(len(scores), device=device)[:, None] * k).view(-1)
        state, history = _select(state, index), history.index_select(0, index)
        lengths, done = lengths.gather(1, origin), done.gather(1, origin)
        lengths = lengths + (~done).float()
        done = done | (tokens2d == end_id)
        tokens = tokens2d.view(-1)
        history = torch.cat([history, tokens[:, None]], 1)
        ended = done.all(-1)
        if ended.any():
            finish(ended.nonzero()[:, 0])
            keep = (~ended).nonzero()[:, 0]
            if not len(keep):
                return results
            rows = (keep[:, None] * k + torch.arange(k, device=device)).view(-1)
            state, history, tokens = _select(state, rows), history.index_select(0, rows), tokens[rows]
            scores, lengths, done, images = scores[keep], lengths[keep], done[keep], images[keep]
    finish(torch.arange(len(scores), device=device))
    return results


@torch.no_grad()
def sample_decode(decoder, feats: torch.Tensor, max_length: int, start_id: int, end_id: int,
                  generator: torch.Generator, no_repeat_ngram: int = 0) -> torch.Tensor:
    """One caption per row of ``feats`` drawn token by token from the decoder's distribution (multinomial; never the
    padding id 0 or ``start_id``): [rows, T] token ids, each row ending with ``end_id`` (unless cut at
    ``max_length`` words), 0-padded after it. ``generator`` lives on ``feats``' device."""
    state = decoder.init_state(feats)
    tokens = torch.full((feats.shape[0],), start_id, dtype=torch.long, device=feats.device)
    done = torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
    out: list[torch.Tensor] = []
    for _ in range(max_length + 1):
        logp, state = decoder.step(state, tokens)
        if out:
            logp = block_repeats(logp, torch.stack(out, 1), no_repeat_ngram)
        probs = logp.float().exp().index_fill(1, torch.tensor([0, start_id], device=logp.device), 0.0)
        drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]
        out.append(drawn.masked_fill(done, 0))
        done |= drawn == end_id
        tokens = drawn
        if done.all():
            break
    return torch.stack(out, 1)
