"""How well a teacher captions held-out images: greedy captions scored against their ground truth."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import Config
from pipeline.data.images import load_rgb
from pipeline.evaluation.metrics import CaptionScorer
from pipeline.teacher.generate import generate_captions
from pipeline.teacher.loading import load_processor, load_teacher


def caption_quality(cfg: Config, rows: list[dict], adapter: Path | None) -> dict:
    """Greedy captions for held-out images and their BLEU-4 / CIDEr-D against the ground truth."""
    processor = load_processor(adapter or cfg.teacher.model)
    model = load_teacher(cfg.teacher.model, adapter, precision=cfg.teacher.precision,
                         attn_implementation=cfg.teacher.attn_implementation, merge=True)
    captions: dict[str, str] = {}
    bs = cfg.teacher.train.per_device_batch_size
    for i in range(0, len(rows), bs):
        chunk = rows[i: i + bs]
        images = [load_rgb(r["image_path"]) for r in chunk]
        gens = generate_captions(model, processor, images, [r["image_id"] for r in chunk], seed=cfg.seed,
                                 temperature=0.0, top_p=1.0,
                                 max_new_tokens=cfg.teacher.train.eval_max_new_tokens)
        captions.update({r["image_id"]: g.caption for r, g in zip(chunk, gens)})
    with CaptionScorer(meteor=False) as scorer:
        scores = scorer.score({r["image_id"]: [r["caption"]] for r in rows}, captions)
    return {"BLEU-4": scores["BLEU-4"], "CIDEr-D": scores["CIDEr-D"], "captions": captions}
