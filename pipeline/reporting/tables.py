"""The report's text: results tables (markdown + CSV), the teacher datasets' table, what distillation buys (the
teacher and the students' size, CPU throughput and quality side by side, from `make bench`'s ``speed.json``) and
the sample gallery (one self-contained HTML page whose captions carry their attribute marks)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.archs import display_name
from pipeline.core.rundir import RunDir, read_manifest
from pipeline.data.formats import load_captions, split_rows
from pipeline.evaluation.attributes import ATTRIBUTES, caption_marks
from pipeline.evaluation.bootstrap import RESAMPLES, compare, describe
from pipeline.evaluation.results import CONSTANT, MAJORITY, RESULT_COLUMNS, best_per_source, merge_seeds, result_rows
from pipeline.inference.speed import read_speed
from pipeline.sweep.summary import SWEEP_COLUMNS, sweep_rows

TEACHER_COLUMNS = ("dataset", "temperature", "captions", "mean length", "p95 length", "vocabulary", "distinct-1",
                   "distinct-2", "BLEU-4 vs GT", "CIDEr-D vs GT", "attributes vs GT", "teacher test BLEU-4",
                   "teacher test CIDEr-D", "teacher test attributes")
MARK_COLOURS = {"right": "#d8f0d8", "wrong": "#f6d0d0", "missed": "#fbe7c2"}
RUNTIME_NAMES = {"torch": "PyTorch", "onnx": "onnxruntime"}
COMPARISON_COLUMNS = ("model", "comparison", "seeds", "attributes: difference [95% interval]",
                      "CIDEr-D: difference [95% interval]")
MEASURED_BY = 'make bench BENCH_ARGS="--only speed"'


def student_label(result: dict) -> str:
    """What a result's student is, as it ran (:func:`pipeline.core.archs.display_name` of its encoder settings)."""
    return display_name(result["arch"], result.get("encoder"))


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
    rows = [[student_label(r), r["source"], *(r["attributes"]["per_attribute"][a]
                                                                  for a in ATTRIBUTES)]
            for r in merge_seeds(results) if "attributes" in r]
    rows += [[MAJORITY, s, *(b["majority"]["per_attribute"][a] for a in ATTRIBUTES)]
             for s, b in baselines.items() if "majority" in b]
    return markdown_table(header, rows)


@dataclass
class SpeedReport:
    """What distillation buys: one record per timed model (:func:`speed_records`), the batch size the sentence and
    the plot compare at (the largest timed) and the results.md section."""

    records: list[dict]
    batch_size: int
    markdown: str
    threads: int = 1


def reference_teacher(rd: RunDir) -> dict | None:
    """The teacher's test-split quality from its most precise captions (the distilled dataset of the lowest
    temperature): ``dataset``, ``temperature``, ``model`` (the base checkpoint), ``attributes`` (macro accuracy),
    ``CIDEr-D``, ``test`` (every figure, per attribute too); None without one."""
    found = []
    for name in rd.distilled_sources():
        meta = json.loads((rd.distill(name) / "meta.json").read_text())
        test = json.loads((rd.distill(name) / "diagnostics.json").read_text())["teacher_on_test"]
        found.append({"dataset": name, "temperature": meta["temperature"], "model": meta.get("teacher_model"),
                      "attributes": test["attributes"]["macro"], "CIDEr-D": test["CIDEr-D"], "test": test})
    return min(found, key=lambda t: t["temperature"], default=None)


def _timing(m: dict) -> dict:
    return {"parameters": m["parameters"], "disk_bytes": m["disk_bytes"], "onnx_bytes": m.get("onnx_bytes"),
            "images_per_s": m["images_per_s"]}


def speed_records(speed: dict, results: Sequence[dict], teacher: dict | None) -> list[dict]:
    """The timed models of ``speed`` (``speed.json``) with their quality, the teacher first, then the students in
    ``results``' order: each student's test attribute accuracy and CIDEr-D from its ``results`` entry, the teacher's
    from ``teacher`` (:func:`reference_teacher`). Each record: ``label``, ``teacher`` (bool), ``arch`` and ``source``
    (students), ``dataset`` (the teacher's), ``parameters``, ``disk_bytes``, ``onnx_bytes``, ``images_per_s``,
    ``attributes``, ``CIDEr-D`` (None where unknown)."""
    timed = {m["name"]: m for m in speed["models"]}
    records = []
    if "teacher" in timed:
        quality = teacher or {}
        label = f"teacher ({quality['dataset']} captions, T={quality['temperature']})" if quality else "teacher"
        records.append({"label": label, "teacher": True, "arch": None, "source": None,
                        "dataset": quality.get("dataset"), "attributes": quality.get("attributes"),
                        "CIDEr-D": quality.get("CIDEr-D"), **_timing(timed["teacher"])})
    for r in results:
        if r["folder"].name in timed:
            records.append({"label": student_label(r), "teacher": False, "arch": r["arch"],
                            "source": r["source"], "dataset": None, "attributes": r.get("attributes", {}).get("macro"),
                            "CIDEr-D": r["test"].get("CIDEr-D"), **_timing(timed[r["folder"].name])})
    return records


def fastest(record: dict, batch_size: int) -> tuple[float, str]:
    """(images/s, runtime) of ``record``'s fastest runtime at ``batch_size``."""
    return max((rates[str(batch_size)], runtime) for runtime, rates in record["images_per_s"].items())


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}" if value < 100 else f"{value:.0f}"


def speed_table(records: Sequence[dict], batch_sizes: Sequence[int]) -> str:
    """Markdown: each model's parameters, size on disk, images/s per runtime and batch size, and quality."""
    columns = [(runtime, b) for runtime in RUNTIME_NAMES for b in batch_sizes
               if any(runtime in r["images_per_s"] for r in records)]
    header = ["model", "trained on", "parameters", "disk MB (PyTorch)", "disk MB (ONNX)",
              *(f"{RUNTIME_NAMES[runtime]} img/s, batch {b}" for runtime, b in columns), "attributes", "CIDEr-D"]
    rows = [[r["label"], r["source"] or "—", _count(r["parameters"]), f"{r['disk_bytes'] / 1e6:.2f}",
             "—" if r["onnx_bytes"] is None else f"{r['onnx_bytes'] / 1e6:.2f}",
             *(_rate(r["images_per_s"].get(runtime, {}).get(str(b))) for runtime, b in columns),
             r["attributes"], r["CIDEr-D"]] for r in records]
    return markdown_table(header, rows)


def speed_sentence(records: Sequence[dict], batch_size: int, threads: int) -> str | None:
    """The best student by attribute accuracy against the teacher, in one sentence: its throughput as a multiple of
    the teacher's and its attribute accuracy as a share of the teacher's; None without both figures."""
    teacher = next((r for r in records if r["teacher"] and r["attributes"]), None)
    students = [r for r in records if not r["teacher"] and r["attributes"] is not None]
    if teacher is None or not students:
        return None
    best = max(students, key=lambda r: (r["attributes"], fastest(r, batch_size)[0]))
    rate, runtime = fastest(best, batch_size)
    teacher_rate, _ = fastest(teacher, batch_size)
    ratio = rate / teacher_rate
    source = "ground-truth" if best["source"] == "gt" else best["source"]
    return (f"{best['label']} trained on {source} captions: {ratio:.{0 if ratio >= 10 else 1}f}× the teacher's "
            f"throughput at {100 * best['attributes'] / teacher['attributes']:.0f}% of its attribute accuracy "
            f"({_rate(rate)} vs {_rate(teacher_rate)} images/s on {threads} CPU thread{'s' * (threads > 1)}, batch "
            f"{batch_size}, {RUNTIME_NAMES[runtime]}; attribute accuracy {best['attributes']:.3f} vs the teacher's "
            f"{teacher['attributes']:.3f} on its {teacher['dataset']} captions).")


def speed_report(rd: RunDir, results: Sequence[dict]) -> SpeedReport | None:
    """What distillation buys, from the run's ``speed.json``; None when `make bench` has not timed the run."""
    speed = read_speed(rd)
    if speed is None:
        return None
    records = speed_records(speed, results, reference_teacher(rd))
    batch_size = max(speed["batch_sizes"])
    parts = ["\n## What distillation buys\n",
             f"Size, CPU throughput and quality of the teacher and each student. Throughput: {speed['images']} test "
             f"images captioned per runtime and batch size on {speed['threads']} CPU thread(s), the median of "
             f"{speed['repeats']} timed pass(es) ({speed.get('measured_by', MEASURED_BY)}, {speed['measured_at']}; "
             f"`{MEASURED_BY}` measures thoroughly); "
             "the teacher greedy, the students with their beam size. Quality on the ground-truth test split; the "
             "teacher's from its most precise distilled captions. Plot: `speed_quality.png`.\n",
             speed_table(records, speed["batch_sizes"])]
    sentence = speed_sentence(records, batch_size, speed["threads"])
    if sentence:
        parts.append(f"\n**{sentence}**\n")
    if speed["stale"]:
        parts.append(f"\nNot shown, retrained since they were timed: {', '.join(speed['stale'])}.\n")
    return SpeedReport(records, batch_size, "\n".join(parts), speed["threads"])


@dataclass
class SweepReport:
    """The finished temperature sweep: its point records, ``best.json`` and the results.md section."""

    records: list[dict]
    best: dict
    markdown: str


def _gain_cell(comparison: dict, split: str, metric: str) -> str:
    """A sweep comparison's gain with its interval (``best.json`` of a sweep measured before intervals: the gain)."""
    interval = comparison.get("intervals", {}).get(split, {}).get(metric)
    return describe(interval) if interval else f"{comparison['gain'][split][metric]:+.3f}"


def sweep_report(rd: RunDir) -> SweepReport | None:
    """The temperature sweep's section (table, chosen temperature, what k samples per image and the unlabelled
    images did); None until `make sweep` has finished."""
    if read_manifest(rd.sweep) is None:
        return None
    records = json.loads((rd.sweep / "points.json").read_text())
    best = json.loads((rd.sweep / "best.json").read_text())
    v, t = best["validation"], best["test"]
    parts = ["\n## Temperature sweep\n",
             f"`make sweep`: the teacher distilled the training images at each temperature and "
             f"{display_name(best['student'])} trained on each. The temperature is chosen on the "
             f"ground-truth **validation** split ({best['select_on']}; ties: {best['ties']}); the test split never "
             "takes part and is shown beside. Plot: `sweep.png`.\n",
             f"**Chosen: T={best['temperature']:g}** (validation: attributes {v['attributes']:.3f}, CIDEr-D "
             f"{v['CIDEr-D']:.3f}; test: attributes {t['attributes']:.3f}, CIDEr-D {t['CIDEr-D']:.3f}).\n",
             markdown_table(SWEEP_COLUMNS, sweep_rows(records, best))]
    if "samples_per_image" in best:
        k = best["samples_per_image"]
        parts.append(f"\nCaptions per image at T={k['temperature']:g}, chosen the same way: k={k['k']}.\n")
    if best["comparisons"]:
        parts += ["\nWhat the points at the chosen temperature did to the student, as measured (gain = the point "
                  "minus what it adds to; negative: a loss), with its 95% paired-bootstrap interval over the "
                  "ground-truth images (per-image attribute agreement and CIDEr-D; **significant** only when the "
                  "interval excludes 0):\n",
                  markdown_table(["comparison", "val attributes", "val CIDEr-D", "test attributes", "test CIDEr-D"],
                                 [[c["what"], *(_gain_cell(c, s, m) for s in ("val", "test")
                                                for m in ("attributes", "CIDEr-D"))]
                                  for c in best["comparisons"]])]
    return SweepReport(records, best, "\n".join(parts))


def _comparison_pairs(sources: Sequence[str]) -> list[tuple[str, str, str]]:
    """(question, source a, source b) of every source comparison the report makes, b measured against a."""
    pairs = []
    for source in sources:
        if source == "gt":
            continue
        if source.startswith("gt+"):
            pairs.append(("unlabelled pool vs ground truth", "gt", source))
        elif source == "creative" and "precise" in sources:
            pairs.append(("creative vs precise", "precise", source))
        else:
            pairs.append((f"{source} vs ground truth", "gt", source))
    return [p for p in pairs if p[1] in sources]


def comparisons_markdown(results: Sequence[dict]) -> str | None:
    """The "With their uncertainty" section: for each architecture, every source comparison (and SCST vs
    cross-entropy where a student was SCST-trained) as the mean per-test-image difference in attribute agreement
    and CIDEr-D with its 95% paired-bootstrap interval, seeds pooled per image (``per_image.json``); None when no
    student has per-image scores."""
    per_image: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        file = r["folder"] / "per_image.json"
        if file.is_file():
            per_image.setdefault((r["arch"], r["source"]), []).append(json.loads(file.read_text()))
    if not per_image:
        return None
    rows = []
    for arch in dict.fromkeys(a for a, _ in per_image):
        sources = [s for a, s in per_image if a == arch]
        for question, a, b in _comparison_pairs(sources):
            runs_a, runs_b = per_image[arch, a], per_image[arch, b]
            found = compare([run["best"] for run in runs_a], [run["best"] for run in runs_b])
            rows.append([display_name(arch), question, f"{len(runs_b)} / {len(runs_a)}",
                         describe(found["attributes"]), describe(found["CIDEr-D"])])
        for source in sources:
            runs = [run for run in per_image[arch, source] if "scst" in run]
            if runs:
                found = compare([run["cross_entropy"] for run in runs], [run["scst"] for run in runs])
                rows.append([display_name(arch), f"SCST vs cross-entropy ({source})", f"{len(runs)} / {len(runs)}",
                             describe(found["attributes"]), describe(found["CIDEr-D"])])
    if not rows:
        return None
    return "\n".join(["\n## Comparisons with their uncertainty\n",
                      "Mean difference per test image (second named minus first) with its 95% paired-bootstrap "
                      f"interval ({RESAMPLES:,} resamples of the test images; each side's per-image score averaged "
                      "over its seeds first); **significant** only when the interval excludes 0.\n",
                      markdown_table(COMPARISON_COLUMNS, rows)])
def _share(value: float | None, of: float | None) -> str:
    return "—" if value is None or not of else f"{100 * value / of:.0f}%"


def answer_markdown(results: Sequence[dict], baselines: dict[str, dict], teacher: dict | None,
                    speed: SpeedReport | None) -> str:
    """results.md's opening: the teacher (:func:`reference_teacher`) against the best student of each source and
    the majority baseline, then the recommended student and, when the run was timed, what it buys in speed."""
    best = best_per_source(results)
    if not best:
        return ""
    t_attr = teacher["attributes"] if teacher else None
    rows = []
    if teacher:
        name = Path(teacher["model"]).name if teacher.get("model") else "teacher"
        rows.append([f"teacher: {name}, fine-tuned (its {teacher['dataset']} captions, T={teacher['temperature']:g})",
                     "—", t_attr, "100%", teacher["CIDEr-D"]])
    rows += [[f"best student: {student_label(r)}", r["source"], r.get("attributes", {}).get("macro"),
              _share(r.get("attributes", {}).get("macro"), t_attr), r["test"].get("CIDEr-D")] for r in best]
    majority = baselines.get("gt", {}).get("majority", {}).get("macro")
    if majority is not None:
        rows.append([MAJORITY, "gt", majority, _share(majority, t_attr), None])
    top = max(best, key=lambda r: (r.get("attributes", {}).get("macro", -1.0), r["test"].get("CIDEr-D", -1.0)))
    sentence = speed and speed_sentence(speed.records, speed.batch_size, speed.threads)
    if sentence:
        recommended = sentence
    else:
        source = "ground-truth" if top["source"] == "gt" else top["source"]
        recommended = (f"{student_label(top)} trained on {source} captions, at "
                       f"{_share(top.get('attributes', {}).get('macro'), t_attr)} of the teacher's attribute accuracy "
                       "(not timed yet: `make speed` or `make bench BENCH_ARGS=\"--only speed\"`, then `make report`).")
    return "\n".join(["## The answer\n", f"**Recommended: {recommended}**\n",
                      "Attribute accuracy (macro, ground-truth test split) of the fine-tuned teacher, the best student "
                      "of each caption source and the majority baseline; \"vs teacher\": the share of the teacher's.\n",
                      markdown_table(["model", "trained on", "attributes", "vs teacher", "CIDEr-D"], rows)])


def results_markdown(results: Sequence[dict], baselines: dict[str, dict], teacher: list[list],
                     speed: SpeedReport | None = None, sweep: SweepReport | None = None, answer: str = "") -> str:
    """results.md: ``answer`` first (:func:`answer_markdown`), then students x sources with their baselines,
    per-attribute accuracies, the teacher datasets and, when the run was timed, what distillation buys; when it was
    swept, the temperature sweep."""
    gt = [r for r in results if r["source"] == "gt"]
    distilled = [r for r in results if r["source"] != "gt"]
    parts = ["# Results\n", *([answer] if answer else []),
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
    if comparisons := comparisons_markdown(results):
        parts.append(comparisons)
    if teacher:
        parts += ["\n## Teacher datasets\n", markdown_table(TEACHER_COLUMNS, teacher)]
    if speed:
        parts.append(speed.markdown)
    if sweep:
        parts.append(sweep.markdown)
    parts += [f"\n`{CONSTANT}`: the most frequent training caption for every test image. `{MAJORITY}`: every "
              "attribute answered with its most frequent value in the source's training captions.\n",
              "Plots: `metrics.png`, `attributes.png`, `curves.png`, `caption_lengths.png`. Samples: "
              "`gallery.html`.\n"]
    return "\n".join(parts)


def gallery_samples(rd: RunDir, results: Sequence[dict], size: int, seed: int) -> list[dict]:
    """``size`` random test images with the ground truth, the teachers' and every student's caption (the first
    seed's)."""
    test = split_rows(load_captions(rd.data / "captions"), "test")
    picked = random.Random(seed).sample(test, min(size, len(test)))
    teacher = {name: json.loads((rd.distill(name) / "test_generations.json").read_text())
               for name in rd.distilled_sources() if (rd.distill(name) / "test_generations.json").is_file()}
    predictions = {}
    for r in merge_seeds(results):
        lines = (r["folder"] / "predictions.jsonl").read_text().splitlines()
        predictions[f"{student_label(r)} ← {r['source']}"] = {
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


def gallery_summary(samples: Sequence[dict]) -> list[list]:
    """Per captioning model (every label but the ground truth): its attributes right, wrong and missed against the
    ground truth over ``samples``' images, and the share right."""
    counts: dict[str, dict[str, int]] = {}
    for s in samples:
        reference = s["captions"].get("ground truth")
        for label, text in s["captions"].items():
            if label == "ground truth" or not reference:
                continue
            tally = counts.setdefault(label, dict.fromkeys(MARK_COLOURS, 0))
            for m in caption_marks(reference, text) if text else []:
                tally[m["status"]] += 1
    return [[label, *c.values(), c["right"] / max(1, sum(c.values()))] for label, c in counts.items()]


FILTER_SCRIPT = """document.getElementById('model').addEventListener('change', function () {
  var wanted = this.value;
  document.querySelectorAll('[data-model]').forEach(function (el) {
    var model = el.getAttribute('data-model');
    el.hidden = wanted !== '' && model !== wanted && model !== 'ground truth';
  });
});"""


def gallery_html(samples: Sequence[dict], title: str) -> str:
    """A self-contained page: each sample has ``image_path``, ``image_id`` and ``captions`` (label -> text, the
    ground truth first). Every other caption gets its attribute marks against the ground truth: green right,
    red wrong, amber stated by the ground truth but missed. It opens with a summary (per model: its marks over the
    shown images) and a model filter (a few lines of inline JavaScript; without it every caption shows)."""
    cards = []
    for s in samples:
        reference = s["captions"].get("ground truth")
        items = []
        for label, text in s["captions"].items():
            marks = _marks_html(reference, text) if reference and text and label != "ground truth" else ""
            items.append(f'<div data-model="{html.escape(label)}"><dt>{html.escape(label)}</dt>'
                         f"<dd>{html.escape(text or '—')}{marks}</dd></div>")
        image = f'<img src="{_image_data_uri(s["image_path"])}" alt="{html.escape(s["image_id"])}">'
        cards.append(f'<section class="card">{image}'
                     f'<div><h2>{html.escape(s["image_id"])}</h2><dl>{"".join(items)}</dl></div></section>')
    legend = "".join(f'<span class="mark {k}">{k}</span>' for k in MARK_COLOURS)
    summary = gallery_summary(samples)
    rows = "".join(f"<tr><td>{html.escape(label)}</td>"
                   + "".join(f"<td>{n}</td>" for n in counts) + f"<td>{100 * share:.0f}%</td></tr>"
                   for label, *counts, share in summary)
    options = "".join(f'<option value="{html.escape(label)}">{html.escape(label)}</option>' for label, *_ in summary)
    style = ("body{font-family:system-ui,sans-serif;margin:2em;background:#fafafa}"
             ".card{display:flex;gap:1.5em;background:#fff;border:1px solid #ddd;border-radius:8px;padding:1em;"
             "margin-bottom:1em}.card img{width:192px;height:192px;object-fit:contain;image-rendering:pixelated}"
             "h2{font-size:1em;margin:0 0 .5em}dt{font-weight:600;font-size:.85em;color:#555}"
             "dd{margin:0 0 .6em 0;font-size:.9em}.marks{margin-top:.25em}"
             "table{border-collapse:collapse;margin-bottom:1em;background:#fff}"
             "td,th{border:1px solid #ddd;padding:.2em .6em;font-size:.85em;text-align:right}"
             "td:first-child,th:first-child{text-align:left}"
             ".mark{display:inline-block;font-size:.75em;border-radius:4px;padding:0 .35em;margin:.1em .2em 0 0}"
             + "".join(f".mark.{k}{{background:{v}}}" for k, v in MARK_COLOURS.items()))
    header = "".join(f"<th>{h}</th>" for h in ("model", *MARK_COLOURS, "right (share)"))
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<h2>Summary: attributes over the {len(samples)} images shown</h2>"
            f'<table class="summary"><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>'
            f'<p><label>Show captions of <select id="model"><option value="">every model</option>{options}'
            f"</select></label> (the ground truth always shows)</p>"
            f"<p>Attribute marks against the ground truth: {legend}</p>{''.join(cards)}"
            f"<script>{FILTER_SCRIPT}</script></body></html>\n")
