"""Model and dataset cards: README.md files whose YAML front matter follows the Hugging Face card conventions."""

import json

import pytest

from pipeline.core.config import EncoderSettings, EncoderStandIn, StudentsConfig
from pipeline.core.errors import PipelineError
from pipeline.data.deepfashion import describe_dataset
from pipeline.evaluation.attributes import ATTRIBUTES
from pipeline.reporting.cards import caption_source, dataset_card, front_matter, student_card
from pipeline.students.checkpoint import describe_student

TEST = {"BLEU-1": 0.61, "BLEU-4": 0.31, "METEOR": 0.27, "ROUGE-L": 0.52, "CIDEr-D": 0.93}
ATTRS = {"macro": 0.71, "per_attribute": {a: 0.5 + i / 100 for i, a in enumerate(ATTRIBUTES)}, "images": 40}


def test_student_card_front_matter_has_the_model_card_keys(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({
        "temperature": 0.2, "top_p": 0.9, "prompt": "Please describe this image.", "seed": 3,
        "teacher_model": "runs/demo/tiny-llava", "adapter": "runs/demo/teacher/adapter"}))
    meta = {**describe_student("vit_transformer", StudentsConfig(beam_size=4), feat_dim=24, vocab_size=50, seed=3,
                               encoder_finetuned=False),
            "caption_source": caption_source(tmp_path, "precise"),
            "test_metrics": {"test": TEST, "attribute_accuracy": ATTRS, "test_images": 40}}
    best = tmp_path / "students" / "vit_transformer__precise" / "best"
    text = student_card(meta, folder=best)
    card = front_matter(text)
    assert card["library_name"] == "pytorch" and card["pipeline_tag"] == "image-to-text"
    assert {"image-captioning", "knowledge-distillation", "vit_transformer"} <= set(card["tags"])
    assert card["architecture"] == "vit_transformer" and card["encoder"] == "vit_b_16"
    assert card["caption_source"] == "precise" and card["teacher"] == "runs/demo/tiny-llava"
    assert card["temperature"] == 0.2 and card["top_p"] == 0.9 and card["seed"] == 3 and card["beam_size"] == 4
    assert card["test_metrics"]["CIDEr-D"] == 0.93 and card["test_metrics"]["attribute_accuracy"] == 0.71
    assert set(card["test_metrics"]["attribute_accuracy_per_attribute"]) == set(ATTRIBUTES)
    result = card["model-index"][0]["results"][0]
    assert card["model-index"][0]["name"] == "vit_transformer__precise"
    assert result["task"]["type"] == "image-to-text" and result["dataset"]["split"] == "test"
    metrics = {m["name"]: m for m in result["metrics"]}
    assert metrics["CIDEr-D"] == {"type": "cider", "name": "CIDEr-D", "value": 0.93}
    assert metrics["attribute accuracy (macro)"]["value"] == 0.71
    assert f"make caption STUDENT={best} IMAGES=" in text and "RUNTIME=onnx" in text  # how to run it
    gt = front_matter(student_card({**meta, "caption_source": caption_source(tmp_path, "gt")}, folder=best))
    assert gt["caption_source"] == "gt" and gt["teacher"] is None and gt["temperature"] is None


def test_dataset_card_front_matter_has_the_dataset_card_keys():
    meta = {"temperature": 0.9, "top_p": 0.95, "seed": 0, "prompt": "Please describe this image in deepfashion "
            "dataset style.", "max_new_tokens": 200, "teacher_model": "llava-1.5-13b-hf", "adapter": "teacher/adapter"}
    diagnostics = {"length_mean": 41.2, "length_p50": 40, "length_p95": 60, "vocabulary": 500, "distinct_1": 0.05,
                   "distinct_2": 0.2, "share_empty": 0.0, "share_truncated": 0.01,
                   "vs_ground_truth": {"BLEU-4": 0.3, "CIDEr-D": 0.8, "attributes": {"macro": 0.7}},
                   "teacher_on_test": {"BLEU-4": 0.28, "CIDEr-D": 0.75, "attributes": {"macro": 0.68}}}
    card = front_matter(dataset_card(name="creative", meta=meta, diagnostics=diagnostics, rejected=3,
                                     counts={"train": 900, "val": 100, "test": 250}))
    assert card["task_categories"] == ["image-to-text"] and card["size_categories"] == ["1K<n<10K"]
    assert card["teacher"] == "llava-1.5-13b-hf" and card["adapter"] == "teacher/adapter"
    assert card["prompt"].startswith("Please describe") and card["temperature"] == 0.9 and card["top_p"] == 0.95
    assert card["seed"] == 0 and card["counts"] == {"train": 900, "val": 100, "test": 250, "rejected": 3}
    assert card["diagnostics"]["distinct_2"] == 0.2
    assert card["diagnostics"]["vs_ground_truth"] == {"BLEU-4": 0.3, "CIDEr-D": 0.8, "attribute_accuracy": 0.7}
    assert card["license"] == "other" and card["source_datasets"] == ["DeepFashion-MultiModal"]
    lite = {"name": "DeepFashion-lite (synthetic renders of real captions)", "synthetic": True}
    text = dataset_card(name="creative", meta=meta, diagnostics=diagnostics, rejected=3, data=lite,
                        counts={"train": 900, "val": 100, "test": 250})
    assert "synthetic-images" in front_matter(text)["tags"] and "not photographs" in text


def test_text_without_front_matter_is_refused():
    with pytest.raises(PipelineError, match="no YAML front matter"):
        front_matter("# just a heading\n")


def _scored(tmp_path, arch: str, encoder: EncoderSettings, training_data: dict | None) -> dict:
    meta = {**describe_student(arch, StudentsConfig(encoder=encoder), feat_dim=24, vocab_size=50, seed=0,
                               encoder_finetuned=False),
            "caption_source": caption_source(tmp_path, "gt"),
            "test_metrics": {"test": TEST, "attribute_accuracy": ATTRS, "test_images": 40}}
    return {**meta, "training_data": training_data} if training_data else meta


def test_cards_say_what_ran_their_licence_and_data(tmp_path):
    lite = tmp_path / "lite"
    lite.mkdir()
    (lite / "README.json").write_text(json.dumps({"dataset": "DeepFashion-lite", "seed": 0}))
    data = describe_dataset(lite)
    assert data["synthetic"] and data["name"] == "DeepFashion-lite (synthetic renders of real captions)"
    assert not describe_dataset(tmp_path)["synthetic"]  # no README.json: the real dataset
    stand_in = EncoderSettings(width=0.25, image_size=96, pretrained=True, weights_dir=tmp_path,
                               stand_in=EncoderStandIn())
    text = student_card(_scored(tmp_path, "resnet101_gru", stand_in, data), folder=tmp_path / "best")
    card = front_matter(text)
    assert card["license"] == "other" and card["license_link"] == "https://github.com/yumingj/DeepFashion-MultiModal"
    assert card["license_name"] and "non-commercial research use only" in text
    assert card["datasets"] == ["DeepFashion-lite (synthetic renders of real captions)"] and "base_model" not in card
    assert card["display_name"] == "ResNet-family stand-in (width 0.25, 96 px) global + GRU"
    assert card["encoder_stand_in"] is True and "synthetic-data" in card["tags"]
    assert card["model-index"][0]["results"][0]["dataset"]["type"] == "deepfashion-lite"
    assert "# ResNet-family stand-in (width 0.25, 96 px) global + GRU trained on `gt` captions" in text
    assert "**Trained on DeepFashion-lite" in text and "ResNet-101" not in text.split("## Test results")[0]
    # the ONNX graphs' inputs and outputs, with this student's image size
    onnx = text.split("## ONNX: inputs and outputs")[1]
    assert "`pixels`, float32 [rows, 3, 96, 96]" in onnx and "`logp`, float32 [rows, vocabulary]" in onnx
    assert "`tokens`, int64 [rows]" in onnx and "init_state.onnx" in onnx
    real = EncoderSettings(width=1.0, image_size=224, pretrained=True)
    card = front_matter(student_card(_scored(tmp_path, "resnet101_gru", real, None), folder=tmp_path / "best"))
    assert card["base_model"] == "timm/resnet101.tv2_in1k" and card["datasets"] == ["DeepFashion-MultiModal"]
    assert card["display_name"] == "ResNet-101 global + GRU" and "synthetic-data" not in card["tags"]


def test_a_caption_of_a_student_trained_on_renders_warns_once(tmp_path, caplog):
    from pipeline.core.rundir import atomic_write_json
    from pipeline.inference.caption import student_captioner
    from tests.helpers import make_student

    best = make_student(tmp_path / "best", "vgg19_gru")
    with caplog.at_level("WARNING"):
        student_captioner(best, runtime="torch")
    assert "renders" not in caplog.text
    meta = json.loads((best / "student.json").read_text())
    atomic_write_json(best / "student.json", {**meta, "training_data": {"name": "DeepFashion-lite (synthetic "
                                                                                 "renders of real captions)",
                                                                         "synthetic": True}})
    with caplog.at_level("WARNING"):
        student_captioner(best, runtime="torch")
    assert caplog.text.count("has only seen such renders") == 1
