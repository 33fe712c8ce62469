"""Does n-gram blocking (``students.no_repeat_ngram``) help? Measured on the ground-truth **validation** split, so
that the default it justifies is not chosen on test images (`make bench BENCH_ARGS="--only ngram"`).

Every finished student of a run (every seed) decodes the validation images with its beam size, blocking off and
then at each n; per n: each student's validation attribute accuracy and CIDEr-D, the share of captions that repeat
an n-gram of tokens (for n = 2, 3, 4), and the paired bootstrap of per-image attribute agreement and CIDEr-D (blocking
minus off) over the validation images, the students pooled per image.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.core.config import Config
from pipeline.core.errors import PipelineError
from pipeline.core.rundir import RunDir, require_stage
from pipeline.data.formats import SPLITS, load_splits
from pipeline.data.text import tokenize
from pipeline.demo.standins import stand_in_weights
from pipeline.evaluation.bootstrap import compare
from pipeline.evaluation.metrics import CaptionScorer
from pipeline.evaluation.results import finished_results
from pipeline.workflows.students import score_checkpoint

REPEAT_SIZES = (2, 3, 4)  # the word n-grams whose repetition is counted


def repeats(caption: str, n: int) -> bool:
    """Whether an n-gram of ``caption``'s tokens (words and punctuation, as the decoder writes them) occurs twice."""
    words = tokenize(caption)
    grams = [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams)


def blocking_on_validation(cfg: Config, sizes: Sequence[int] = (2, 3, 4)) -> dict:
    """The measurement of the module docstring on the run ``cfg`` names: ``{"images", "students": {folder: {n:
    {"attributes", "CIDEr-D", "repeats": {size: share}}}}, "pooled": {n: compare(off, n)}}`` (n = 0: off)."""
    from pipeline.students.features import DecoderInputs

    rd = RunDir(cfg.run_dir)
    require_stage(rd.data, "prepare")
    results, _ = finished_results(rd)
    if not results:
        raise PipelineError(f"{rd.students}: no finished students; run the 'students' stage first")
    gt = load_splits(rd.data / "captions")
    inputs = DecoderInputs(rd.students / "features", cfg.students, cfg.seed,
                           sorted({r["image_path"] for s in SPLITS for r in gt[s]}), stand_in_weights(cfg))
    students, per_image = {}, {n: [] for n in (0, *sizes)}
    with CaptionScorer(meteor=False) as scorer:
        for r in results:
            figures = students[r["folder"].name] = {}
            for n in (0, *sizes):
                found = score_checkpoint(r["folder"] / "best", gt["val"], scorer, inputs, cfg.students.beam_size,
                                         no_repeat_ngram=n)
                captions = list(found["predictions"].values())
                figures[n] = {"attributes": found["attributes"]["macro"], "CIDEr-D": found["scores"]["CIDEr-D"],
                              "repeats": {size: sum(repeats(c, size) for c in captions) / len(captions)
                                          for size in REPEAT_SIZES}}
                per_image[n].append(found["per_image"])
    return {"images": len(gt["val"]), "beam_size": cfg.students.beam_size, "students": students,
            "pooled": {n: compare(per_image[0], per_image[n]) for n in sizes}}
