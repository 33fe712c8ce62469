"""The demo's point: the teacher and the students read the photo. A small version of the demo's set-up (pretraining
stand-ins on held-out rendered images: the tiny LLaVA's pretraining, a student's encoder; a student trained on the
ground truth) must beat the majority-attribute baseline and lose accuracy when its images are swapped; a model that
ignored its image input fails these checks. The fine-tuned teacher's own figures come from `make demo`
(docs/results.md)."""

import json
from argparse import Namespace

import pytest

from pipeline.core.config import load_config
from pipeline.data.formats import load_captions, split_rows
from pipeline.demo.base_model import ensure_base_model
from stages import prepare, students
from tests.helpers import write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("see")
    path = write_config(
        folder,
        data={"synthetic": {"num_images": 500, "image_size": 64}, "split": {"test": 0.3, "val": 0.1},
              "pretraining": {"images": 1500, "root": str(folder / "pretraining")}},
        teacher={"tiny": {"pretrain": {"vision_epochs": 12, "language_epochs": 6}}},
        students={"archs": ["resnet101_gru", "vgg19_gru"], "sources": ["gt"], "epochs": 24, "val_every_epochs": 6,
                  "beam_size": 1, "encoder": {"pretrained": True, "weights_dir": str(folder / "weights"),
                                              "width": 0.25, "image_size": 64,
                                              "stand_in": {"epochs": 12, "images": 800, "by_encoder": {
                                                  "vgg19": {"epochs": 20, "learning_rate": 1.0e-3}}}}})
    cfg = load_config(path)
    prepare.run(cfg, Namespace(force=False))
    data = load_captions(cfg.run_dir / "data" / "captions")
    ensure_base_model(cfg, [r["caption"] for r in split_rows(data, "train")])  # the tiny LLaVA's pretraining
    students.run(cfg, Namespace(force=False))
    return cfg


def test_the_pretraining_images_are_in_no_split(run):
    data = load_captions(run.run_dir / "data" / "captions")
    used = {path.rsplit("/", 1)[-1] for split in data.values() for path in split["image_path"]}
    held_out = json.loads((run.data.pretraining.root / "captions.json").read_text())
    assert len(held_out) == 1500 and len(used) > 400 and not set(held_out) & used


def test_stand_in_encoder_reads_the_attributes(run):
    record = json.loads((run.students.encoder.weights_dir / "resnet101-cd907fc2.pth.json").read_text())
    assert record["held_out_macro"] > 0.85, record["held_out_accuracy"]


def test_pretrained_teacher_answers_what_the_image_shows(run):
    """The tiny LLaVA's pretraining stand-in: asked for the attribute list of a test image, it beats the majority
    answer clearly, and its answers change with the image."""
    import torch

    from pipeline.data.images import load_rgb
    from pipeline.demo.tiny_pretrain import QUESTION, read_attribute_list
    from pipeline.evaluation.attributes import ATTRIBUTES, caption_labels, majority_values
    from pipeline.teacher.collator import build_prompt
    from pipeline.teacher.loading import load_base_model, load_processor

    data = load_captions(run.run_dir / "data" / "captions")
    test = split_rows(data, "test")[:96]
    processor = load_processor(run.teacher.model, padding_side="left")
    model = load_base_model(run.teacher.model, "fp32").eval()
    images = [load_rgb(r["image_path"]) for r in test]

    def answers(pictures):
        batch = processor(images=pictures, text=[build_prompt(processor, QUESTION)] * len(pictures),
                          return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=100, do_sample=False)
        texts = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [read_attribute_list(t) for t in texts]

    def accuracy(stated, truth):
        return sum(s[a] == t[a] for s, t in zip(stated, truth) for a in ATTRIBUTES) / (len(truth) * len(ATTRIBUTES))

    truth = [caption_labels(r["caption"]) for r in test]
    majority = majority_values([r["caption"] for r in split_rows(data, "train")])
    seen = accuracy(answers(images), truth)
    assert seen > accuracy([majority] * len(truth), truth) + 0.05, seen
    assert seen - accuracy(answers(images[1:] + images[:1]), truth) > 0.03  # swapped images: worse answers


@pytest.mark.parametrize("arch", ["resnet101_gru", "vgg19_gru"])
def test_student_reads_the_image_and_loses_it_when_images_are_swapped(run, arch):
    metrics = json.loads((run.run_dir / "students" / f"{arch}__gt" / "metrics.json").read_text())
    baseline = json.loads((run.run_dir / "students" / "baseline__gt" / "metrics.json").read_text())
    accuracy, majority = metrics["attributes"]["macro"], baseline["majority"]["macro"]
    assert accuracy > majority + 0.05, (accuracy, majority)
    assert metrics["image_reliance"]["attribute_macro_drop"] > 0.05, metrics["image_reliance"]
