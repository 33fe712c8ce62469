"""The demo's point: the teacher and the students read the photo. A small version of the demo's set-up (pretraining
stand-ins on held-out rendered images, the teacher's pretraining, finetune, distill, a student on the ground truth)
must beat the majority-attribute baseline and lose accuracy when its images are swapped; a model that ignored its
image input fails these checks."""

import json
from argparse import Namespace

import pytest
from conftest import write_config

from pipeline.config import load_config
from pipeline.teacher.dataset import distill_dataset
from stages import finetune, prepare, students

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("see")
    path = write_config(
        folder,
        data={"synthetic": {"num_images": 500, "image_size": 64}, "split": {"test": 0.3, "val": 0.1},
              "pretraining": {"images": 800, "root": str(folder / "pretraining")}},
        teacher={"tiny": {"pretrain": {"vision_epochs": 12, "language_epochs": 5}},
                 "lora": {"train_projector": False},
                 "train": {"epochs": 3, "eval_steps": 100, "save_steps": 100, "max_val_samples": 16,
                           "eval_generation_samples": 4}},
        distill={"batch_size": 64, "max_new_tokens": 120},
        students={"archs": ["resnet101_gru"], "sources": ["gt"], "epochs": 10, "val_every_epochs": 5,
                  "beam_size": 1, "encoder": {"pretrained": True, "weights_dir": str(folder / "weights"),
                                              "width": 0.25, "image_size": 64, "stand_in": {"epochs": 10}}})
    cfg = load_config(path)
    args = Namespace(force=False)
    for stage in (prepare, finetune):
        stage.run(cfg, args)
    distill_dataset(cfg)
    students.run(cfg, args)
    return cfg


def test_the_pretraining_images_are_in_no_split(run):
    from pipeline.data.formats import load_captions

    data = load_captions(run.run_dir / "data" / "captions")
    used = {path.rsplit("/", 1)[-1] for split in data.values() for path in split["image_path"]}
    held_out = json.loads((run.data.pretraining.root / "captions.json").read_text())
    assert len(held_out) == 800 and len(used) > 400 and not set(held_out) & used


def test_stand_in_encoder_reads_the_attributes(run):
    record = json.loads((run.students.encoder.weights_dir / "resnet101-cd907fc2.pth.json").read_text())
    assert record["held_out_macro"] > 0.85, record["held_out_accuracy"]


def test_teacher_states_the_outfit_of_the_image(run):
    diag = json.loads((run.run_dir / "distill" / "precise" / "diagnostics.json").read_text())
    teacher, majority = diag["teacher_on_test"]["attributes"]["macro"], diag["majority_attributes"]["macro"]
    assert teacher > majority + 0.05, (teacher, majority)


def test_student_reads_the_image_and_loses_it_when_images_are_swapped(run):
    metrics = json.loads((run.run_dir / "students" / "resnet101_gru__gt" / "metrics.json").read_text())
    baseline = json.loads((run.run_dir / "students" / "baseline__gt" / "metrics.json").read_text())
    accuracy, majority = metrics["attributes"]["macro"], baseline["majority"]["macro"]
    assert accuracy > majority + 0.05, (accuracy, majority)
    assert metrics["image_reliance"]["attribute_macro_drop"] > 0.05, metrics["image_reliance"]
