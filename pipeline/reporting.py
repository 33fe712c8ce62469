"""The report's text: results tables (markdown + CSV), the teacher datasets' table and the sample gallery (one
self-contained HTML page whose captions carry their attribute marks)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import random
from collections.abc import Sequence
from typing import Any

from pipeline.attribute_metrics import ATTRIBUTES, caption_marks
from pipeline.data.formats import load_captions, split_rows
from pipeline.results import ARCH_NAMES, CONSTANT, MAJORITY, RESULT_COLUMNS, result_rows
from pipeline.rundir import RunDir

TEACHER_COLUMNS = ("dataset", "temperature", "captions", "mean length", "p95 length", "vocabulary", "distinct-1",
                   "distinct-2", "BLEU-4 vs GT", "CIDEr-D vs GT", "attributes vs GT", "teacher test BLEU-4",
                   "teacher test CIDEr-D", "teacher test attributes")
MARK_COLOURS = {"right": "#d8f0d8", "wrong": "#f6d0d0", "missed": "#fbe7c2"}


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    return buf.getvalue()


def teacher_rows(rd: RunDir) -> list[list]:
    """One row per distilled dataset (diagnostics.json), the ground truth's own figures first."""
    rows = []
    for name in rd.distilled_sources():
        d = json.loads((rd.distill(name) / "diagnostics.json").read_text())
        meta = json.loads((rd.distill(name) / "meta.json").read_text())
        vs, test = d["vs_ground_truth"], d.get("teacher_on_test", {})
        rows.append([name, meta["temperature"], d["captions"], d["length_mean"], d["length_p95"], d["vocabulary"],
                     d["distinct_1"], d["distinct_2"], vs["BLEU-4"], vs["CIDEr-D"],
                     vs.get("attributes", {}).get("macro"), test.get("BLEU-4"), test.get("CIDEr-D"),
                     test.get("attributes", {}).get("macro")])
        if not any(r[0] == "ground truth" for r in rows):
            g = d["ground_truth"]
            rows.insert(0, ["ground truth", None, g["captions"], g["length_mean"], g["length_p95"], g["vocabulary"],
                            g["distinct_1"], g["distinct_2"], None, None, None, None, None, None])
            if "majority_attributes" in d:
                rows.insert(1, [MAJORITY, None, *[None] * 11, d["majority_attributes"]["macro"]])
    return rows


def _attribute_table(results: Sequence[dict], baselines: dict[str, dict]) -> str:
    header = ["model", "trained on", *ATTRIBUTES]
    rows = [[ARCH_NAMES.get(r["arch"], r["arch"]), r["source"], *(r["attributes"]["per_attribute"][a]
                                                                  for a in ATTRIBUTES)]
            for r in results if "attributes" in r]
    rows += [[MAJORITY, s, *(b["majority"]["per_attribute"][a] for a in ATTRIBUTES)]
             for s, b in baselines.items() if "majority" in b]
    return markdown_table(header, rows)


def results_markdown(results: Sequence[dict], baselines: dict[str, dict], teacher: list[list]) -> str:
    """results.md: students x sources with their baselines, per-attribute accuracies, the teacher datasets."""
    gt = [r for r in results if r["source"] == "gt"]
    distilled = [r for r in results if r["source"] != "gt"]
    parts = ["# Results\n",
             "All students are scored on the ground-truth test split: pycocoevalcap's BLEU-4, CIDEr-D, METEOR 1.5 and "
             "ROUGE-L, and **attributes**: the macro accuracy over the outfit attributes a caption states (gender, "
             "sleeve, neckline, fabric and pattern per garment, accessories, ...; an attribute the reference does "
             "not state counts as absent). *Image withheld*: each test image swapped for another one (fixed "
             "permutation) before decoding; the drop is what the student gets from looking at the photo.\n",
             "## Students trained on the ground truth\n",
             markdown_table(RESULT_COLUMNS, result_rows(gt, {k: v for k, v in baselines.items() if k == "gt"}))]
    if distilled:
        parts += ["\n## Students trained on teacher captions\n",
                  markdown_table(RESULT_COLUMNS,
                                 result_rows(distilled, {k: v for k, v in baselines.items() if k != "gt"}))]
    parts += ["\n## Attribute accuracy per attribute\n", _attribute_table(results, baselines)]
    if teacher:
        parts += ["\n## Teacher datasets\n", markdown_table(TEACHER_COLUMNS, teacher)]
    parts += [f"\n`{CONSTANT}`: the most frequent training caption for every test image. `{MAJORITY}`: every "
              "attribute answered with its most frequent value in the source's training captions.\n",
              "Plots: `metrics.png`, `attributes.png`, `curves.png`, `caption_lengths.png`. Samples: "
              "`gallery.html`.\n"]
    return "\n".join(parts)


def gallery_samples(rd: RunDir, results: Sequence[dict], size: int, seed: int) -> list[dict]:
    """``size`` random test images with the ground truth, the teachers' and every student's caption."""
    test = split_rows(load_captions(rd.data / "captions"), "test")
    picked = random.Random(seed).sample(test, min(size, len(test)))
    teacher = {name: json.loads((rd.distill(name) / "test_generations.json").read_text())
               for name in rd.distilled_sources() if (rd.distill(name) / "test_generations.json").is_file()}
    predictions = {}
    for r in results:
        lines = (r["folder"] / "predictions.jsonl").read_text().splitlines()
        predictions[f"{ARCH_NAMES.get(r['arch'], r['arch'])} ← {r['source']}"] = {
            x["image_id"]: x["caption"] for x in map(json.loads, lines)}
    samples = []
    for row in picked:
        captions = {"ground truth": row["caption"]}
        captions.update({f"teacher ({name})": gen.get(row["image_id"]) for name, gen in teacher.items()})
        captions.update({label: preds.get(row["image_id"]) for label, preds in predictions.items()})
        samples.append({"image_id": row["image_id"], "image_path": row["image_path"], "captions": captions})
    return samples


def _image_data_uri(path: str, size: int = 192) -> str:
    from pipeline.data.images import load_rgb

    im = load_rgb(path)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _marks_html(reference: str, caption: str) -> str:
    chips = []
    for m in caption_marks(reference, caption):
        text = (f"{m['label']}: {m['stated']}" if m["status"] == "right" else
                f"{m['label']}: {m['stated']} (GT {m['expected']})" if m["status"] == "wrong" else
                f"{m['label']}: not stated (GT {m['expected']})")
        chips.append(f'<span class="mark {m["status"]}" title="{m["status"]}">{html.escape(text)}</span>')
    return f'<div class="marks">{"".join(chips)}</div>'


def gallery_html(samples: Sequence[dict], title: str) -> str:
    """A self-contained page: each sample has ``image_path``, ``image_id`` and ``captions`` (label -> text, the
    ground truth first). Every other caption gets its attribute marks against the ground truth: green right,
    red wrong, amber stated by the ground truth but missed."""
    cards = []
    for s in samples:
        reference = s["captions"].get("ground truth")
        items = []
        for label, text in s["captions"].items():
            marks = _marks_html(reference, text) if reference and text and label != "ground truth" else ""
            items.append(f"<dt>{html.escape(label)}</dt><dd>{html.escape(text or '—')}{marks}</dd>")
        image = f'<img src="{_image_data_uri(s["image_path"])}" alt="{html.escape(s["image_id"])}">'
        cards.append(f'<section class="card">{image}'
                     f'<div><h2>{html.escape(s["image_id"])}</h2><dl>{"".join(items)}</dl></div></section>')
    legend = "".join(f'<span class="mark {k}">{k}</span>' for k in MARK_COLOURS)
    style = ("body{font-family:system-ui,sans-serif;margin:2em;background:#fafafa}"
             ".card{display:flex;gap:1.5em;background:#fff;border:1px solid #ddd;border-radius:8px;padding:1em;"
             "margin-bottom:1em}.card img{width:192px;height:192px;object-fit:contain;image-rendering:pixelated}"
             "h2{font-size:1em;margin:0 0 .5em}dt{font-weight:600;font-size:.85em;color:#555}"
             "dd{margin:0 0 .6em 0;font-size:.9em}.marks{margin-top:.25em}"
             ".mark{display:inline-block;font-size:.75em;border-radius:4px;padding:0 .35em;margin:.1em .2em 0 0}"
             + "".join(f".mark.{k}{{background:{v}}}" for k, v in MARK_COLOURS.items()))
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>Attribute marks against the ground truth: {legend}</p>{''.join(cards)}</body></html>\n")
