"""Model and dataset cards: ``README.md`` files with YAML front matter in the Hugging Face card conventions.

A student's ``best/`` gets a model card (architecture, encoder, caption source, teacher and its sampling settings,
seed, test metrics with attribute accuracy, how to run it); a distilled dataset folder gets a dataset card (teacher,
adapter, prompt, temperature, top-p, seed, counts, diagnostics). The metadata block holds every figure; the text
below it repeats the main ones for people.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.archs import display_name, is_stand_in
from pipeline.core.errors import PipelineError
from pipeline.data.deepfashion import SOURCE, describe_dataset
from pipeline.evaluation.attributes import ATTRIBUTES
from pipeline.reporting.tables import markdown_table

# the data's terms (DeepFashion-MultiModal: non-commercial research use only) bind every model and caption set made
# from it, the demo's DeepFashion-lite too: its captions are the real ones
LICENSE = {"license": "other", "license_name": "deepfashion-multimodal-non-commercial-research",
           "license_link": SOURCE}
LICENSE_TEXT = (f"The data's terms apply: DeepFashion-MultiModal ({SOURCE}) is released for **non-commercial "
                "research use only**, and its captions (real, or rendered in DeepFashion-lite) are in this work.")
REAL_DATA = describe_dataset(Path("/nonexistent"))  # what a card says when nothing else is known: the real dataset
# the Hugging Face Hub copies of the torchvision ImageNet weights the full-size encoders load (timm's)
HUB_WEIGHTS = {"vgg19": "timm/vgg19.tv_in1k", "resnet101": "timm/resnet101.tv2_in1k"}
ONNX_TEXT = """`make export` writes `onnx/` beside the weights: three graphs that run in onnxruntime without torch
(`pipeline/students/onnx_runtime.py` is a complete greedy and beam-search loop over them). Every first axis (`rows`)
is dynamic; beam search feeds batch x beams rows.

- `encoder.onnx`: input `pixels`, float32 [rows, 3, {size}, {size}]: RGB resized to {size} px, scaled to 0-1, then
  normalised with mean {mean} and std {std}; output `features`, float32, the decoder's input ([rows, dim] or
  [rows, regions, dim]).
- `init_state.onnx`: input `features`; outputs the decoder state tensors, in the order `onnx/onnx.json` lists them
  (`state`).
- `step.onnx`: inputs `tokens`, int64 [rows], the previous word ids (first step: `<start>`), and the state tensors;
  outputs `logp`, float32 [rows, vocabulary], the next word's log-probabilities, and `new_<name>` for each state
  tensor that changes (`onnx.json`: `updated`; the `growing` ones gain one position a step).

Word ids are `vocab.json`'s; decoding stops at `<end>` or after {max_length} words.
"""
NGRAM_METRICS = {"BLEU-1": "bleu", "BLEU-2": "bleu", "BLEU-3": "bleu", "BLEU-4": "bleu", "METEOR": "meteor",
                 "ROUGE-L": "rouge", "CIDEr-D": "cider"}  # metric -> Hugging Face metric type


def front_matter(text: str) -> dict[str, Any]:
    """The YAML metadata block of a card (between the leading ``---`` lines)."""
    if not text.startswith("---\n") or "\n---\n" not in text[3:]:
        raise PipelineError("card has no YAML front matter (--- ... --- at the top)")
    return yaml.safe_load(text[4: text.index("\n---\n", 3)]) or {}


def render_card(metadata: Mapping[str, Any], body: str) -> str:
    return f"---\n{yaml.safe_dump(dict(metadata), sort_keys=False, allow_unicode=True)}---\n\n{body}"


def caption_source(folder: Path, name: str) -> dict[str, Any]:
    """Where a source's captions came from: ``gt`` (the dataset's own), a distilled dataset (its ``meta.json``) or
    ``gt+<dataset>`` (the ground truth plus that dataset's captions of its unlabelled images)."""
    if name == "gt":
        return {"name": "gt", "kind": "ground truth", "teacher": None, "temperature": None, "top_p": None}
    meta = json.loads((folder / "meta.json").read_text())
    kind = "ground truth + distilled unlabelled" if name.startswith("gt+") else "distilled"
    return {"name": name, "kind": kind, "teacher": meta.get("teacher_model", meta.get("teacher_dir")),
            "adapter": meta.get("adapter"), "temperature": meta["temperature"], "top_p": meta["top_p"],
            "prompt": meta["prompt"], "seed": meta["seed"], "dataset": str(folder),
            "samples_per_image": meta.get("samples_per_image", 1), "unlabeled": meta.get("unlabeled")}


def _model_index(name: str, test: Mapping[str, float], attribute_macro: float, data: Mapping[str, Any]
                 ) -> list[dict]:
    metrics = [{"type": NGRAM_METRICS[m], "name": m, "value": round(v, 4)} for m, v in test.items()
               if m in NGRAM_METRICS]
    metrics.append({"type": "accuracy", "name": "attribute accuracy (macro)", "value": round(attribute_macro, 4)})
    kind = "deepfashion-lite" if data["synthetic"] else "deepfashion-multimodal"
    return [{"name": name, "results": [{
        "task": {"type": "image-to-text", "name": "Image captioning"},
        "dataset": {"name": f"{data['name']}, ground-truth test split", "type": kind, "split": "test"},
        "metrics": metrics}]}]


def training_data_note(data: Mapping[str, Any]) -> str:
    """One sentence for a model trained on DeepFashion-lite: it reads renders, not photos; "" for real data."""
    if not data.get("synthetic"):
        return ""
    return ("**Trained on DeepFashion-lite: synthetic renders of real DeepFashion-MultiModal captions.** It has only "
            "ever seen such renders; on a photograph (of clothes or of anything else) its caption means little.")


def student_card(meta: Mapping[str, Any], *, folder: Path) -> str:
    """The model card of the student in ``folder`` from its scored ``student.json`` (``meta``)."""
    arch, source, tm = meta["arch"], meta["caption_source"], meta["test_metrics"]
    data = meta.get("training_data", REAL_DATA)
    name = f"{arch}__{source['name']}"
    attributes = tm["attribute_accuracy"]
    settings = meta["encoder"].get("settings", {})
    hub_weights = None if is_stand_in(settings) else HUB_WEIGHTS.get(meta["encoder"]["name"])
    metadata = {
        "library_name": "pytorch", "pipeline_tag": "image-to-text", **LICENSE,
        **({"base_model": hub_weights} if hub_weights else {}),
        "datasets": [data["name"], *([] if source["name"] == "gt" else [f"fashion-distill {source['name']} captions"])],
        "tags": ["image-captioning", "fashion", "deepfashion", "knowledge-distillation", "fashion-distill", arch,
                 *(["synthetic-data"] if data["synthetic"] else [])],
        "model-index": _model_index(name, tm["test"], attributes["macro"], data),
        "architecture": arch, "display_name": display_name(arch, settings), "encoder": meta["encoder"]["name"],
        "encoder_width": settings.get("width", 1.0), "encoder_stand_in": is_stand_in(settings),
        "encoder_finetuned": meta["encoder_finetuned"], "training_data": data["name"],
        "image_size": meta["image"]["size"], "caption_source": source["name"], "teacher": source["teacher"],
        "temperature": source["temperature"], "top_p": source["top_p"], "seed": meta["seed"],
        "beam_size": meta["beam_size"], "max_length": meta["max_length"],
        "test_metrics": {**{m: round(v, 4) for m, v in tm["test"].items()},
                         "attribute_accuracy": round(attributes["macro"], 4),
                         "attribute_accuracy_per_attribute": {a: round(v, 4)
                                                              for a, v in attributes["per_attribute"].items()},
                         "test_images": tm["test_images"]},
    }
    teacher = (f"captions the fine-tuned teacher ({source['teacher']}) wrote at temperature "
               f"{source['temperature']}, top-p {source['top_p']}, {source.get('samples_per_image', 1)} per image")
    trained_on = ("the dataset's own (ground-truth) captions" if source["name"] == "gt" else
                  f"the ground-truth captions plus {teacher} of the unlabelled images in `{source['unlabeled']}` "
                  f"(dataset `{source['dataset']}`)" if source["kind"].startswith("ground truth") else
                  f"{teacher} (dataset `{source['name']}`)")
    rows = [[m, v] for m, v in tm["test"].items()] + [["attribute accuracy (macro)", attributes["macro"]]]
    per_attribute = [[label, attributes["per_attribute"][a]] for a, label in ATTRIBUTES.items()]
    encoder_state = "fine-tuned" if meta["encoder_finetuned"] else "frozen"
    encoder_text = (f"a {display_name(arch, settings)} image encoder (not the full-size {meta['encoder']['name']} "
                    "with its ImageNet weights)" if is_stand_in(settings) else
                    f"a {meta['encoder']['name']} image encoder")
    note = training_data_note(data)
    body = f"""# {display_name(arch, settings)} trained on `{source['name']}` captions
{f"{chr(10)}{note}{chr(10)}" if note else ""}
A small fashion-image captioner distilled by fashion-distill: {encoder_text} ({encoder_state},
{meta['image']['size']} px) and a `{arch}` decoder, trained on {trained_on} of {data['name']}, seed {meta['seed']}.
Scored on the ground-truth test split ({tm['test_images']} images), beam size {meta['beam_size']}.

{LICENSE_TEXT}

## Test results

{markdown_table(['metric', 'value'], rows)}
Attribute accuracy (does the caption state the right value, "absent" included):

{markdown_table(['attribute', 'accuracy'], per_attribute)}
## How to run it

From the fashion-distill project folder; the folder describes itself, no run config is needed:

```bash
# a file, a folder or a quoted glob ('photos/*.jpg'); BEAM=1 is greedy
make caption STUDENT={folder} IMAGES=path/to/photos OUT=captions.jsonl
# onnxruntime only (no torch at inference): export once, then RUNTIME=onnx
make export STUDENT={folder}
make caption STUDENT={folder} IMAGES=path/to/photos RUNTIME=onnx
```

Each line of `captions.jsonl` holds the image path, its caption and the attributes the caption states. In Python:

```python
from pathlib import Path

from pipeline.data.images import load_rgb
from pipeline.students.checkpoint import load_student

student = load_student(Path("{folder}"))
student.caption([load_rgb("photo.jpg")], beam_size={meta['beam_size']})
```

## ONNX: inputs and outputs

{ONNX_TEXT.format(size=meta['image']['size'], mean=meta['image']['mean'], std=meta['image']['std'],
                  max_length=meta['max_length'])}
## Files

`student.json` (architecture, decoder and encoder settings, image transform, maximum length, beam size, caption
source, training data, test metrics), `model.safetensors` (decoder), `encoder.safetensors` (image encoder),
`vocab.json`, `onnx/` after `make export`.
"""
    return render_card(metadata, body)


def dataset_card(*, name: str, meta: Mapping[str, Any], diagnostics: Mapping[str, Any], counts: Mapping[str, int],
                 rejected: int, data: Mapping[str, Any] = REAL_DATA) -> str:
    """The dataset card of a distilled caption dataset (``meta.json``, ``diagnostics.json`` and split counts) of
    the images of ``data`` (:func:`pipeline.data.deepfashion.describe_dataset`)."""
    vs_gt, on_test = diagnostics["vs_ground_truth"], diagnostics["teacher_on_test"]
    total = sum(counts.values())
    metadata = {
        "pretty_name": f"fashion-distill {name} captions", "language": ["en"], "task_categories": ["image-to-text"],
        **LICENSE, "source_datasets": [data["name"]],
        "tags": ["image-captioning", "fashion", "deepfashion", "knowledge-distillation", "fashion-distill",
                 "synthetic-captions", *(["synthetic-images"] if data["synthetic"] else [])],
        "annotations_creators": ["machine-generated"],
        "size_categories": ["n<1K" if total < 1000 else "1K<n<10K" if total < 10_000 else "10K<n<100K"],
        "teacher": meta.get("teacher_model", meta.get("teacher_dir")), "adapter": meta.get("adapter"),
        "prompt": meta["prompt"], "temperature": meta["temperature"], "top_p": meta["top_p"], "seed": meta["seed"],
        "max_new_tokens": meta["max_new_tokens"], "samples_per_image": meta.get("samples_per_image", 1),
        "engine": meta.get("engine"), "unlabeled": diagnostics.get("unlabeled"),
        "counts": {**dict(counts), "rejected": rejected},
        "diagnostics": {k: diagnostics[k] for k in ("length_mean", "length_p50", "length_p95", "vocabulary",
                                                    "distinct_1", "distinct_2", "share_empty", "share_truncated")}
        | {"vs_ground_truth": {"BLEU-4": vs_gt["BLEU-4"], "CIDEr-D": vs_gt["CIDEr-D"],
                               "attribute_accuracy": vs_gt["attributes"]["macro"]},
           "teacher_on_test": {"BLEU-4": on_test["BLEU-4"], "CIDEr-D": on_test["CIDEr-D"],
                               "attribute_accuracy": on_test["attributes"]["macro"]}},
    }
    split_counts = " / ".join(str(counts.get(split, 0)) for split in ("train", "val", "test"))
    k, unlabeled = metadata["samples_per_image"], metadata["unlabeled"]
    rows = [["captions (train / val / test)", split_counts], ["captions per train/val image", k],
            *([["unlabelled images: captioned / skipped", f"{unlabeled['captioned']} / {unlabeled['skipped']}"]]
              if unlabeled else []),
            ["rejected (empty or truncated; skipped unlabelled files)", rejected],
            ["mean length (words)", diagnostics["length_mean"]],
            ["vocabulary", diagnostics["vocabulary"]], ["distinct-2", diagnostics["distinct_2"]],
            ["BLEU-4 / CIDEr-D vs ground truth", f"{vs_gt['BLEU-4']:.3f} / {vs_gt['CIDEr-D']:.3f}"],
            ["attribute accuracy vs ground truth", vs_gt["attributes"]["macro"]],
            ["teacher on the test split: attribute accuracy", on_test["attributes"]["macro"]]]
    engine = meta.get("engine")
    engine_text = f", generated by {engine['name']} {engine['version']}" if engine else ""
    unlabeled_text = f" and the unlabelled images of `{unlabeled['folder']}` (train split)" if unlabeled else ""
    note = ("\n**The images are DeepFashion-lite's: synthetic renders of real DeepFashion-MultiModal captions, not "
            "photographs.**\n" if data["synthetic"] else "")
    body = f"""# `{name}`: fashion captions written by a fine-tuned LLaVA teacher
{note}
Every train and val image of the run{unlabeled_text} captioned {k} time(s) by the teacher `{metadata['teacher']}`
(LoRA adapter `{meta.get('adapter')}`) with the prompt "{meta['prompt']}", temperature {meta['temperature']},
top-p {meta['top_p']}, sample j of an image seeded from (seed {meta['seed']}, image id, j){engine_text}. The test
split is the ground truth, unchanged: students trained on these captions are scored against it. Images: {data['name']}.

{LICENSE_TEXT}

{markdown_table(['', 'value'], rows)}
Files: `captions/` (Hugging Face `datasets`, splits train/val/test, columns `image_id, image_path, caption, split,
source, sample, origin`: `sample` is j, `origin` is `dataset` or `unlabeled`), `generations.jsonl`, `meta.json`,
`diagnostics.json`, `rejected.json`, `test_generations.json`.
"""
    return render_card(metadata, body)
