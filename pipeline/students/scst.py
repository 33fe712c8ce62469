"""Self-critical sequence training (SCST; Rennie et al., CVPR 2017) of a student after its cross-entropy training
(``students.scst``, on when ``students.scst.epochs`` > 0).

Each training image gets ``samples`` captions drawn from the decoder (multinomial, every architecture through its
``step``); a sample's reward is its CIDEr-D against the **training source's** captions of that image, with document
frequencies from that source's training captions (:class:`CiderD`, computed once per student), plus
``attribute_weight`` x its attribute agreement with those captions (the project's parser). The baseline of a
sample is the mean reward of the other samples of its image ("new SCST", as in ruotianluo/ImageCaptioning.pytorch),
so the advantages of an image sum to zero; the loss is ``-advantage x log p(sample)`` per token. Only the decoder
learns (a fine-tuned encoder stays at its cross-entropy weights); dropout is off while sampling and learning, so
the samples come from the policy being trained. Test captions are never passed in: rewards read the training rows,
the checkpoint is picked on the ground-truth validation split as in cross-entropy training.

Folders in the student's output: ``cross_entropy/`` (the cross-entropy pick, copied from ``best/`` before SCST
starts), ``scst/`` (the SCST epoch best on validation), ``scst_last/`` (resume after every epoch) and ``best/``:
whichever of the two validates better (``students.select_on``; ties: the other metric).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pipeline.core.config import StudentsConfig
from pipeline.core.rundir import atomic_write_json, publish_dir
from pipeline.data.text import tokenize
from pipeline.evaluation.attributes import attribute_accuracy, attribute_agreement
from pipeline.evaluation.metrics import CaptionScorer
from pipeline.students.beam import sample_decode
from pipeline.students.checkpoint import load_weights, save_weights
from pipeline.students.decoders import build_decoder
from pipeline.students.features import compute_device
from pipeline.students.train import FeatureFn, decode_split
from pipeline.students.vocab import Vocabulary

log = logging.getLogger(__name__)
NGRAMS, SIGMA = 4, 6.0  # pycocoevalcap's CIDEr-D settings
Ngrams = dict[tuple[str, ...], int]


def _counts(tokens: Sequence[str]) -> Ngrams:
    counts: Ngrams = defaultdict(int)
    for n in range(1, NGRAMS + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i: i + n])] += 1
    return counts


class CiderD:
    """CIDEr-D with fixed document frequencies: pycocoevalcap's ``CiderScorer`` arithmetic (tf-idf n-gram vectors,
    n = 1..4, clipped, Gaussian length penalty sigma 6, x10, mean over the references), with the document
    frequencies and the references' vectors computed once from ``corpus`` (image -> its reference token lists, one
    document per image) instead of from the captions being scored."""

    def __init__(self, corpus: Mapping[str, Sequence[Sequence[str]]]):
        if not corpus:
            raise ValueError("CIDEr-D needs a non-empty reference corpus")
        self.df: dict[tuple[str, ...], float] = defaultdict(float)
        cooked = {image: [_counts(ref) for ref in refs] for image, refs in corpus.items()}
        for refs in cooked.values():
            for ngram in {g for ref in refs for g in ref}:
                self.df[ngram] += 1
        self.ref_len = math.log(float(len(corpus)))
        self.refs = {image: [self._vector(ref) for ref in refs] for image, refs in cooked.items()}

    def _vector(self, counts: Ngrams) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(NGRAMS)]
        norm = [0.0] * NGRAMS
        length = 0
        for ngram, tf in counts.items():
            n = len(ngram) - 1
            vec[n][ngram] = float(tf) * (self.ref_len - math.log(max(1.0, self.df.get(ngram, 0.0))))
            norm[n] += vec[n][ngram] ** 2
            if n == 1:  # pycocoevalcap's length: the number of bigrams (kept for fidelity)
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, image: str, tokens: Sequence[str]) -> float:
        """CIDEr-D of one caption (tokens) against ``image``'s references."""
        vec, norm, length = self._vector(_counts(tokens))
        refs = self.refs[image]
        total = 0.0
        for vec_ref, norm_ref, length_ref in refs:
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * SIGMA ** 2))
            for n in range(NGRAMS):
                val = sum(min(w, vec_ref[n].get(g, 0.0)) * vec_ref[n].get(g, 0.0) for g, w in vec[n].items())
                if norm[n] and norm_ref[n]:
                    val /= norm[n] * norm_ref[n]
                total += val * penalty
        return total / NGRAMS / len(refs) * 10.0


class Reward:
    """A sampled caption's reward: CIDEr-D against the training source's captions of its image (document
    frequencies from all of the source's training captions) + ``attribute_weight`` x the mean attribute agreement
    with those captions."""

    def __init__(self, train_rows: Sequence[Mapping[str, str]], attribute_weight: float):
        self.captions: dict[str, list[str]] = defaultdict(list)
        for row in train_rows:
            self.captions[row["image_id"]].append(row["caption"])
        self.cider = CiderD({k: [tokenize(c) for c in v] for k, v in self.captions.items()})
        self.attribute_weight = attribute_weight

    def __call__(self, image: str, caption: str) -> float:
        reward = self.cider.score(image, tokenize(caption))
        if self.attribute_weight:
            refs = self.captions[image]
            reward += self.attribute_weight * sum(attribute_agreement(r, caption) for r in refs) / len(refs)
        return reward


def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[images, samples] rewards minus each sample's baseline, the mean reward of its image's other samples."""
    k = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def scst_loss(model: nn.Module, feats: torch.Tensor, samples: torch.Tensor, advantage: torch.Tensor,
              start_id: int) -> torch.Tensor:
    """Policy-gradient loss of ``samples`` [rows, T] (0-padded after ``<end>``) under ``model`` (teacher-forced):
    ``-advantage x log p`` of every sampled token, averaged over the tokens."""
    inputs = torch.cat([torch.full_like(samples[:, :1], start_id), samples[:, :-1]], 1)
    mask = (samples != 0).float()
    logits, _ = model(feats, inputs, (inputs != 0).float())
    logp = torch.log_softmax(logits.float(), -1).gather(-1, samples[..., None])[..., 0]
    return -(advantage[:, None] * logp * mask).sum() / mask.sum().clamp(min=1)


def _copy_student(source: Path, target: Path) -> None:
    with publish_dir(target) as tmp:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)


def run_scst(arch: str, cfg: StudentsConfig, features: FeatureFn, feat_dim: int, train_rows: Sequence[Mapping],
             val_captions: Sequence[str], vocab: Vocabulary, out_dir: Path, seed: int, scorer: CaptionScorer
             ) -> dict[str, Any]:
    """SCST of the student whose cross-entropy pick is ``out_dir/best`` (see the module docstring); resumes from
    ``out_dir/scst_last``. ``train_rows``: the source's training rows (``image_id``, ``caption``) in the order of
    ``features("train", ...)``; ``val_captions``: the ground truth's, in the order of ``features("val", ...)``."""
    from torch.utils.tensorboard import SummaryWriter

    s, device = cfg.scst, compute_device()
    ce_dir, scst_dir, last = out_dir / "cross_entropy", out_dir / "scst", out_dir / "scst_last"
    if not (ce_dir / "student.json").is_file():
        _copy_student(out_dir / "best", ce_dir)
    ce_meta = json.loads((ce_dir / "student.json").read_text())
    torch.manual_seed(seed)
    model = build_decoder(arch, feat_dim, len(vocab), cfg).to(device)
    load_weights(ce_dir, model, None)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
    state = {"epoch": 0, "step": 0, "best": None, "best_attributes": None, "best_epoch": None,
             "curves": {"reward": [], "val_cider": [], "val_attributes": []}}
    if (last / "state.json").is_file():
        load_weights(last, model, None)
        optimizer.load_state_dict(torch.load(last / "optimizer.pt", map_location=device, weights_only=True))
        state = json.loads((last / "state.json").read_text())
        log.info("%s: resuming SCST after epoch %d", out_dir.name, state["epoch"])
    first_row: dict[str, int] = {}
    for i, row in enumerate(train_rows):
        first_row.setdefault(row["image_id"], i)
    images = list(first_row)
    reward = Reward(train_rows, s.attribute_weight)
    writer = SummaryWriter(str(out_dir / "tensorboard"))

    def rank(cider: float, attributes: float) -> tuple[float, float]:
        return (attributes, cider) if cfg.select_on == "attributes" else (cider, attributes)

    while state["epoch"] < s.epochs:
        epoch = state["epoch"]
        generator = torch.Generator(device=device).manual_seed(seed * 1000 + 500 + epoch)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed * 1000 + 500 + epoch))
        model.eval()  # no dropout: the samples come from the policy that learns
        bar = tqdm(range(0, len(images), s.batch_size), desc=f"{out_dir.name} SCST epoch {epoch + 1}", leave=False)
        for start in bar:
            batch = [images[i] for i in order[start: start + s.batch_size].tolist()]
            with torch.no_grad():
                feats = features("train", torch.tensor([first_row[k] for k in batch])).to(device)
            feats = feats.repeat_interleave(s.samples, 0)
            samples = sample_decode(model, feats, cfg.max_length, vocab.start_id, vocab.end_id, generator,
                                    cfg.no_repeat_ngram)
            rewards = torch.tensor([reward(batch[i // s.samples], vocab.decode(row))
                                    for i, row in enumerate(samples.tolist())], device=device).view(-1, s.samples)
            loss = scst_loss(model, feats, samples, advantages(rewards).view(-1), vocab.start_id)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            state["step"] += 1
            mean_reward = rewards.mean().item()
            writer.add_scalar("scst/reward", mean_reward, state["step"])
            state["curves"]["reward"].append([state["step"], round(mean_reward, 5)])
            bar.set_postfix(reward=f"{mean_reward:.3f}")
        state["epoch"] = epoch + 1
        cider, attributes = validation_scores(model, features, val_captions, vocab, cfg, scorer)
        writer.add_scalar("scst/val_CIDEr-D", cider, state["step"])
        state["curves"]["val_cider"].append([state["step"], round(cider, 5)])
        state["curves"]["val_attributes"].append([state["step"], round(attributes, 5)])
        log.info("%s SCST epoch %d: val CIDEr-D %.3f, val attributes %.3f", out_dir.name, state["epoch"], cider,
                 attributes)
        if state["best"] is None or rank(cider, attributes) > rank(state["best"], state["best_attributes"]):
            state.update(best=cider, best_attributes=attributes, best_epoch=state["epoch"])
            meta = {**ce_meta, "scst": {**s.model_dump(mode="json"), "epoch": state["epoch"]},
                    "val_cider": cider, "val_attributes": attributes}
            with publish_dir(scst_dir) as tmp:  # a student like best/: the cross-entropy pick's encoder, as it is
                save_weights(tmp, model, None)
                vocab.save(tmp / "vocab.json")
                atomic_write_json(tmp / "student.json", meta)
                if (ce_dir / "encoder.safetensors").is_file():
                    shutil.copy2(ce_dir / "encoder.safetensors", tmp / "encoder.safetensors")
        with publish_dir(last) as tmp:
            save_weights(tmp, model, None)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            atomic_write_json(tmp / "state.json", state)
    writer.close()
    selected = "scst" if rank(state["best"], state["best_attributes"]) > rank(
        ce_meta["val_cider"], ce_meta["val_attributes"]) else "cross_entropy"
    _copy_student(out_dir / selected, out_dir / "best")
    return {"selected": selected, "epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
            "best_val_cider": state["best"], "best_val_attributes": state["best_attributes"],
            "cross_entropy_val_cider": ce_meta["val_cider"], "cross_entropy_val_attributes": ce_meta["val_attributes"],
            "steps": state["step"], "curves": state["curves"], "settings": s.model_dump(mode="json")}


def validation_scores(model: nn.Module, features: FeatureFn, val_captions: Sequence[str], vocab: Vocabulary,
                      cfg: StudentsConfig, scorer: CaptionScorer) -> tuple[float, float]:
    """Validation CIDEr-D and macro attribute accuracy of ``model`` as cross-entropy training measures them."""
    hyps = decode_split(model, features, "val", len(val_captions), vocab, cfg.val_beam_size, cfg.max_length,
                        no_repeat_ngram=cfg.no_repeat_ngram)
    refs = {str(i): c for i, c in enumerate(val_captions)}
    preds = {str(i): h for i, h in enumerate(hyps)}
    cider = scorer.score({k: [c] for k, c in refs.items()}, preds, only=("CIDEr-D",))["CIDEr-D"]
    return cider, attribute_accuracy(refs, preds)["macro"]
