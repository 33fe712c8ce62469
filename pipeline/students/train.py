"""Training, model selection and test scoring of one student (architecture x caption source).

Batches are padded caption id sequences with masked cross-entropy; inputs come from a feature source (cached
features of a frozen encoder, or an encoder run in the loop when it is fine-tuned). Every epoch ends with an atomic
``last/`` checkpoint (weights as safetensors, optimizer state, loop state), so a killed run resumes where it was; the
best model by validation attribute accuracy or CIDEr-D (``students.select_on``) is kept in ``best/``, self-describing
(see :mod:`pipeline.students.runtime`): it rebuilds and captions with no config.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pipeline.core.config import StudentsConfig
from pipeline.core.rundir import atomic_write_json, publish_dir, record_entries
from pipeline.evaluation.attributes import attribute_accuracy
from pipeline.evaluation.metrics import CaptionScorer
from pipeline.students.beam import beam_search
from pipeline.students.checkpoint import (
    describe_student,
    load_resume_state,
    load_weights,
    rng_state,
    save_optimizer,
    save_student,
    save_weights,
    set_rng_state,
)
from pipeline.students.decoders import build_decoder
from pipeline.students.features import compute_device
from pipeline.students.vocab import Vocabulary

log = logging.getLogger(__name__)
FeatureFn = Callable[[str, torch.Tensor], torch.Tensor]  # (split, row indices) -> decoder input features


def pad_batch(seqs: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    out = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out


def epoch_batches(lengths: list[int], batch_size: int, generator: torch.Generator,
                  group_by_length: bool) -> list[list[int]]:
    """One epoch's batches of caption indices: random, or grouped by length (transformers' mega-batch grouping,
    then the batches in random order, so that an epoch does not run from the longest captions to the shortest)."""
    if not group_by_length:
        order = torch.randperm(len(lengths), generator=generator).tolist()
        return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    from transformers.trainer_pt_utils import get_length_grouped_indices

    order = get_length_grouped_indices(lengths, batch_size, generator=generator)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Mean cross-entropy over non-padding target tokens."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       ignore_index=pad_id)


def decode_split(model: nn.Module, features: FeatureFn, split: str, n: int, vocab: Vocabulary, beam: int,
                 max_length: int, batch_size: int = 512, no_repeat_ngram: int = 0) -> list[str]:
    model.eval()
    out: list[str] = []
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        with torch.no_grad(), _autocast():
            seqs = beam_search(model, features(split, idx).to(compute_device()), beam, max_length, vocab.start_id,
                               vocab.end_id, no_repeat_ngram)
        out += [vocab.decode(s) for s in seqs]
    return out


def _autocast():
    if torch.cuda.is_available():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train_student(arch: str, cfg: StudentsConfig, features: FeatureFn, feat_dim: int,
                  captions: dict[str, list[str]], vocab: Vocabulary, out_dir: Path, seed: int,
                  scorer: CaptionScorer, encoder: nn.Module | None = None,
                  frozen_encoder: nn.Module | None = None) -> dict[str, Any]:
    """Train on ``captions["train"]``, select on validation (``cfg.select_on``); resumes from ``out_dir/last``.

    ``encoder``: the image encoder that ``features`` runs, fine-tuned with ``cfg.encoder_lr`` (the decoder gets
    ``cfg.decoder_lr``) and checkpointed with the decoder. It stays in eval mode: BatchNorm keeps its statistics
    (caption batches are small) and the features match what the cache of the frozen encoder would hold.
    ``frozen_encoder``: the encoder that computed cached ``features``, saved with ``best/`` so that it runs alone.
    """
    from torch.utils.tensorboard import SummaryWriter

    device = compute_device()
    torch.manual_seed(seed)
    model = build_decoder(arch, feat_dim, len(vocab), cfg).to(device)
    groups = [{"params": list(model.parameters()), "lr": cfg.decoder_lr}]
    if encoder is not None:
        encoder.eval().requires_grad_(True)
        groups.append({"params": list(encoder.parameters()), "lr": cfg.encoder_lr})
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.Adam(groups)
    targets = [vocab.encode(c, cfg.max_length) for c in captions["train"]]
    state = {"epoch": 0, "step": 0, "best": float("-inf"), "best_attributes": None, "best_epoch": None,
             "best_step": None, "bad_validations": 0,
             "curves": {"train_loss": [], "val_cider": [], "val_attributes": []}}
    last = out_dir / "last"
    if (last / "state.json").is_file():
        load_weights(last, model, encoder)
        state, rng = load_resume_state(last, optimizer, device)
        if rng is not None:  # (a last/ saved before it was there resumes without it)
            set_rng_state(rng)
        log.info("%s: resuming after epoch %d", out_dir.name, state["epoch"])
    resumed_after = state["epoch"]
    record_entries(out_dir, ["tensorboard"])
    writer = SummaryWriter(str(out_dir / "tensorboard"))
    meta = describe_student(arch, cfg, feat_dim=feat_dim, vocab_size=len(vocab), seed=seed,
                            encoder_finetuned=encoder is not None)

    def rank(cider: float, attributes: float) -> tuple[float, float]:
        """A validation's standing: ``cfg.select_on`` first, the other metric breaks ties."""
        return (attributes, cider) if cfg.select_on == "attributes" else (cider, attributes)

    def validate(epoch: float, train_loss: float) -> None:
        """Val CIDEr-D and attribute accuracy now; keep best/ (``cfg.select_on``, ties: the other), count rounds
        without improvement (early stopping)."""
        hyps = decode_split(model, features, "val", len(captions["val"]), vocab, cfg.val_beam_size, cfg.max_length,
                            no_repeat_ngram=cfg.no_repeat_ngram)
        model.train()
        refs = {str(i): c for i, c in enumerate(captions["val"])}
        preds = {str(i): h for i, h in enumerate(hyps)}
        cider = scorer.score({k: [c] for k, c in refs.items()}, preds, only=("CIDEr-D",))["CIDEr-D"]
        attributes = attribute_accuracy(refs, preds)["macro"]
        for name, value in (("CIDEr-D", cider), ("attributes", attributes)):
            writer.add_scalar(f"val/{name}", value, state["step"])
        state["curves"]["val_cider"].append([state["step"], round(cider, 5)])
        state["curves"]["val_attributes"].append([state["step"], round(attributes, 5)])
        log.info("%s epoch %.4g step %d: train loss %.3f, val CIDEr-D %.3f, val attributes %.3f", out_dir.name, epoch,
                 state["step"], train_loss, cider, attributes)
        if state["best_attributes"] is None or rank(cider, attributes) > rank(state["best"], state["best_attributes"]):
            state.update(best=cider, best_attributes=attributes, best_epoch=round(epoch, 4), best_step=state["step"],
                         bad_validations=0)
            save_student(out_dir / "best", model, vocab, {**meta, "epoch": round(epoch, 4), "step": state["step"],
                                                          "val_cider": cider, "val_attributes": attributes},
                         encoder if encoder is not None else frozen_encoder)
        else:
            state["bad_validations"] += 1

    def stopped() -> bool:
        return state["bad_validations"] >= cfg.early_stop_patience

    def budget_spent() -> bool:
        return cfg.max_steps is not None and state["step"] >= cfg.max_steps

    started, n_captions = time.perf_counter(), 0
    lengths = [len(t) for t in targets]
    while state["epoch"] < cfg.epochs and not stopped() and not budget_spent():
        epoch = state["epoch"]
        model.train()
        batches = epoch_batches(lengths, cfg.batch_size, torch.Generator().manual_seed(seed * 1000 + epoch),
                                cfg.group_by_length)
        bar = tqdm(batches, desc=f"{out_dir.name} epoch {epoch + 1}", unit="batch", leave=False)
        validated = False
        for n, batch in enumerate(bar, 1):
            idx = torch.tensor(batch)
            seq = pad_batch([targets[i] for i in batch]).to(device)
            inp, tgt = seq[:, :-1], seq[:, 1:]
            with _autocast():
                logits, reg = model(features("train", idx).to(device), inp, (inp != 0).float())
                loss = caption_loss(logits.float(), tgt)
                total = loss + cfg.attention_reg * reg if reg is not None else loss
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            state["step"] += 1
            n_captions += len(idx)
            writer.add_scalar("train/loss", loss.item(), state["step"])
            state["curves"]["train_loss"].append([state["step"], round(loss.item(), 5)])
            bar.set_postfix(loss=f"{loss.item():.3f}")
            validated = bool(cfg.val_every_steps) and state["step"] % cfg.val_every_steps == 0
            if validated:
                validate(epoch + n / len(batches), loss.item())
                if stopped():
                    break
            if budget_spent():
                break
        state["epoch"] = epoch + 1
        epoch_due = not cfg.val_every_steps and state["epoch"] % cfg.val_every_epochs == 0
        if not validated and not stopped() and (epoch_due or state["epoch"] == cfg.epochs or budget_spent()):
            validate(state["epoch"], loss.item())
        with publish_dir(last) as tmp:
            save_weights(tmp, model, encoder)
            save_optimizer(tmp, optimizer)
            atomic_write_json(tmp / "state.json", state)
            atomic_write_json(tmp / "rng.json", rng_state())
    writer.close()
    seconds = time.perf_counter() - started
    return {"epochs_run": state["epoch"], "resumed_after_epoch": resumed_after, "best_epoch": state["best_epoch"],
            "best_step": state["best_step"], "best_val_cider": state["best"],
            "best_val_attributes": state["best_attributes"],
            "selected_on": cfg.select_on, "steps": state["step"],
            "captions_per_second": round(n_captions / seconds, 1) if n_captions else None, "curves": state["curves"]}
