"""One student experiment (architecture x caption source): train, pick on validation, score on the ground-truth test
split (n-gram metrics, attributes) and measure how much the captions depend on the image.

Image reliance: the test split is decoded a second time with the image inputs permuted across test images (a fixed
permutation); a captioner that reads the photo loses attribute accuracy and CIDEr-D, one that writes the same outfit
whatever it sees loses nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.core.archs import ARCHS
from pipeline.core.config import Config
from pipeline.core.errors import PipelineError
from pipeline.core.rundir import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    is_up_to_date,
    reset_work_dir,
    write_manifest,
)
from pipeline.data.deepfashion import describe_dataset
from pipeline.data.formats import ORIGIN_UNLABELED, load_captions, split_rows
from pipeline.evaluation.attributes import attribute_accuracy
from pipeline.evaluation.bootstrap import per_image_scores
from pipeline.evaluation.metrics import CaptionScorer
from pipeline.evaluation.results import RESULT_COLUMNS, finished_results, result_rows
from pipeline.reporting.cards import caption_source, student_card
from pipeline.reporting.tables import csv_text, markdown_table
from pipeline.students.checkpoint import load_student, record_test_results
from pipeline.students.encoders import build_encoder
from pipeline.students.features import DecoderInputs
from pipeline.students.scst import run_scst
from pipeline.students.train import FeatureFn, decode_split, train_student
from pipeline.students.vocab import Vocabulary
from pipeline.workflows import depends
from pipeline.workflows.depends import source_dir

log = logging.getLogger(__name__)
TABLE_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
RELIANCE_SEED = 1234  # the test-image permutation of the image-reliance control (fixed across runs and models)


def student_dir(rd: RunDir, arch: str, source: str) -> Path:
    """The folder of the first (or only) seed's model; :func:`pipeline.workflows.depends.student_folder` for any."""
    return rd.students / f"{arch}__{source}"


def source_rows(rd: RunDir, source: str, gt: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """What a student of ``source`` trains on, with the ground truth's ``val`` and ``test`` rows (``gt``) whatever
    the source: ``gt``'s own train rows; a distilled dataset's (every one of its k samples per image, its unlabelled
    images included); for ``gt+<dataset>``, the ground truth's plus the dataset's rows of unlabelled images."""
    dataset = depends.source_dataset(source)
    if dataset is None:
        return gt
    train = split_rows(load_captions(rd.distill(dataset) / "captions"), "train")
    if source != dataset:
        extra = [r for r in train if r.get("origin") == ORIGIN_UNLABELED]
        if not extra:
            raise PipelineError(f"{rd.distill(dataset)}: source '{source}' adds the dataset's captions of unlabelled "
                                "images, and it has none (distil it with distill.unlabeled=<folder>)")
        train = gt["train"] + extra
    return {"train": train, "val": gt["val"], "test": gt["test"]}


def permuted_images(features: FeatureFn, split: str, n: int, seed: int = RELIANCE_SEED) -> FeatureFn:
    """``features`` with the images of ``split`` shuffled across its ``n`` rows (a fixed permutation)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return lambda s, idx: features(s, perm[idx] if s == split else idx)


def score_test_split(scorer: CaptionScorer, references: dict[str, str], predictions: dict[str, str],
                only: tuple[str, ...] | None = None) -> dict:
    """n-gram metrics (``only``: families) and attribute accuracy of ``predictions`` against the references."""
    return {"test": scorer.score({k: [v] for k, v in references.items()}, predictions, only=only),
            "attributes": attribute_accuracy(references, predictions)}


def image_reliance(scores: dict, permuted: dict) -> dict:
    """How much worse the captions get when each test image is swapped for another one."""
    return {"attribute_macro_drop": scores["attributes"]["macro"] - permuted["attributes"]["macro"],
            "cider_drop": scores["test"]["CIDEr-D"] - permuted["test"]["CIDEr-D"],
            "permuted": {"CIDEr-D": permuted["test"]["CIDEr-D"], "attribute_macro": permuted["attributes"]["macro"],
                         "per_attribute": permuted["attributes"]["per_attribute"]},
            "seed": RELIANCE_SEED}


def score_checkpoint(folder: Path, rows: list[dict], scorer: CaptionScorer, decoder_inputs: Callable,
                     beam_size: int, no_repeat_ngram: int | None = None) -> dict:
    """The student saved in ``folder`` (a ``best/``) captions the images of ``rows`` (a ground-truth split, one
    caption per image) with ``beam_size``: BLEU, ROUGE-L and CIDEr-D against their captions and attribute accuracy
    and each image's (``per_image``: :func:`pipeline.evaluation.bootstrap.per_image_scores`), and the captions:
    ``{"scores", "attributes", "per_image", "predictions"}``. ``decoder_inputs`` is the one the student was trained
    with; ``no_repeat_ngram``: n-gram blocking other than the student's own (``student.json``)."""
    best = load_student(folder)
    arch = best.meta["arch"]
    feats, encoder = decoder_inputs(arch, {"split": [r["image_path"] for r in rows]})
    if encoder is not None:  # a fine-tuned encoder: the checkpoint's weights
        encoder.load_state_dict(best.encoder.state_dict())
    hyps = decode_split(best.decoder, feats, "split", len(rows), best.vocab, beam_size, best.meta["max_length"],
                        no_repeat_ngram=best.meta.get("no_repeat_ngram", 0) if no_repeat_ngram is None
                        else no_repeat_ngram)
    predictions = {r["image_id"]: h for r, h in zip(rows, hyps)}
    references = {r["image_id"]: r["caption"] for r in rows}
    return {"scores": scorer.score({k: [v] for k, v in references.items()}, predictions,
                                   only=("BLEU", "ROUGE-L", "CIDEr-D")),
            "attributes": attribute_accuracy(references, predictions),
            "per_image": per_image_scores(scorer, references, predictions), "predictions": predictions}


def run_experiment(cfg: Config, rd: RunDir, *, arch: str, source: str, rows: dict[str, list[dict]],
                   test_rows: list[dict], scorer: CaptionScorer, decoder_inputs: DecoderInputs, force: bool,
                   seed: int | None = None, variant: str | None = None) -> dict:
    """Train ``arch`` on ``rows`` (:func:`source_rows`: every (image, caption) row of train is an example, so k
    captions of an image are k examples; val picks the checkpoint) with ``seed`` (default the run's), then SCST when
    ``students.scst.epochs`` > 0 (:mod:`pipeline.students.scst`: train rows and val captions only), score it on the
    ground-truth ``test_rows``; returns its metrics (also in ``metrics.json``; with SCST, the cross-entropy and the
    SCST checkpoints' test figures side by side, ``best/`` the one validation picks; ``per_image.json``: each
    test image's attribute agreement and CIDEr-D, for the paired bootstrap). An up-to-date output is read back
    instead; ``decoder_inputs(arch, paths)`` gives (features, encoder being fine-tuned or None); ``variant``: a sweep
    step control's folder (:func:`pipeline.workflows.depends.student_folder`)."""
    seed = cfg.seed if seed is None else seed
    out = depends.student_folder(cfg, rd, arch, source, seed, variant)
    decoder_inputs.ensure_weights(ARCHS[arch].encoder)  # a demo stand-in is built first: the student depends on it
    config, inputs = depends.student(cfg, rd, arch, source, seed)
    if not force and is_up_to_date(out, config, inputs):
        log.info("%s is up to date", out.name)
        return json.loads((out / "metrics.json").read_text())
    reset_work_dir(out, config, inputs, force=force)
    started = time.time()
    captions = {s: [r["caption"] for r in rows[s]] for s in ("train", "val")}
    if not captions["train"] or not captions["val"]:
        raise PipelineError(f"{source_dir(rd, source)}: source '{source}' needs non-empty train and val splits")
    vocab = Vocabulary.build(captions["train"], cfg.students.min_word_count)
    paths = {s: [r["image_path"] for r in split] for s, split in (("train", rows["train"]), ("val", rows["val"]),
                                                                   ("test", test_rows))}
    feats, encoder = decoder_inputs(arch, paths)
    s = cfg.students
    # the cache's encoder (the feature cache is the run seed's: the seeds differ in their decoders)
    frozen = build_encoder(ARCHS[arch].encoder, s.encoder, cfg.seed) if encoder is None else None
    result = train_student(arch, s, feats, feats.dim, captions, vocab, out, seed, scorer, encoder, frozen)
    curves = result.pop("curves")
    if s.scst.epochs:
        scst = run_scst(arch, s, feats, feats.dim, [{"image_id": r["image_id"], "caption": r["caption"]}
                                                    for r in rows["train"]],
                        captions["val"], vocab, out, seed, scorer)
        curves = {**curves, "scst": scst.pop("curves")}
        result["scst_training"] = scst
    best = load_student(out / "best")
    if encoder is not None:  # the features' fine-tuned encoder: the best checkpoint's weights, not the last epoch's
        encoder.load_state_dict(best.encoder.state_dict())
    model, vocab = best.decoder, best.vocab
    references = {r["image_id"]: r["caption"] for r in test_rows}

    def predict(features: FeatureFn, decoder=model) -> dict[str, str]:
        hyps = decode_split(decoder, features, "test", len(test_rows), vocab, s.beam_size, s.max_length,
                            no_repeat_ngram=s.no_repeat_ngram)
        return {r["image_id"]: h for r, h in zip(test_rows, hyps)}

    predictions = predict(feats)
    scores = score_test_split(scorer, references, predictions)
    permuted = score_test_split(scorer, references, predict(permuted_images(feats, "test", len(test_rows))),
                           only=("CIDEr-D",))
    per_image = {"best": per_image_scores(scorer, references, predictions)}
    metrics = {"arch": arch, "source": source, "seed": seed, "test_images": len(test_rows), "vocabulary": len(vocab),
               **scores, "image_reliance": image_reliance(scores, permuted), **result}
    if s.scst.epochs:  # both checkpoints' test figures, side by side
        selected = result["scst_training"]["selected"]
        for name in ("cross_entropy", "scst"):
            other = predictions if name == selected else predict(feats, load_student(out / name).decoder)
            figures = score_test_split(scorer, references, other)
            metrics[name] = {"test": figures["test"], "attributes": figures["attributes"]}
            per_image[name] = per_image_scores(scorer, references, other)
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps({"image_id": k, "caption": v}) + "\n"
                                                         for k, v in predictions.items()))
    atomic_write_json(out / "per_image.json", per_image)
    atomic_write_json(out / "curves.json", curves)
    atomic_write_json(out / "metrics.json", metrics)
    shipped = record_test_results(out / "best", caption_source=caption_source(source_dir(rd, source), source),
                                  training_data=describe_dataset(cfg.data.root),
                                  test_metrics={"test": scores["test"], "attribute_accuracy": scores["attributes"],
                                                "test_images": len(test_rows)})
    atomic_write_text(out / "best" / "README.md", student_card(shipped, folder=out / "best"))
    figures = {k: round(v, 4) for k, v in scores["test"].items()}
    figures.update(attribute_macro=round(scores["attributes"]["macro"], 4),
                   attribute_reliance_drop=round(metrics["image_reliance"]["attribute_macro_drop"], 4))
    write_manifest(out, stage="students", config=config, inputs=inputs, started=started, seed=seed,
                   figures=figures)
    log.info("%s: %s; attributes %.3f (image withheld: %.3f)", out.name,
             ", ".join(f"{k} {scores['test'][k]:.3f}" for k in TABLE_METRICS if k in scores["test"]),
             scores["attributes"]["macro"], permuted["attributes"]["macro"])
    return metrics


def write_summary(rd: RunDir) -> str:
    """``students/summary.md`` and ``summary.csv``: every finished student and the baselines; returns the markdown."""
    rows = result_rows(*finished_results(rd))
    md = markdown_table(RESULT_COLUMNS, rows)
    atomic_write_text(rd.students / "summary.md", md)
    atomic_write_text(rd.students / "summary.csv", csv_text(RESULT_COLUMNS, rows))
    return md
