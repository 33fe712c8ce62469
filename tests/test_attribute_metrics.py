"""Attribute-level evaluation: exact accuracies on planted errors, the majority baseline, image reliance, and
`stages.evaluate` on every predictions format and bad input."""

import csv
import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from pipeline.demo.synthetic import load_caption_pool
from pipeline.evaluation.attributes import (
    ABSENT,
    ATTRIBUTES,
    attribute_accuracy,
    caption_labels,
    caption_marks,
    majority_baseline,
    majority_values,
)
from pipeline.evaluation.predictions import PredictionsError, read_predictions

CAPTION = ("The {who} wears a {sleeve}-sleeve shirt with cotton fabric and solid color patterns. The {who} wears "
           "long trousers. The trousers are with denim fabric and striped patterns.{extra}")


def caption(sleeve: str = "long", who: str = "lady", extra: str = "") -> str:
    return CAPTION.format(sleeve=sleeve, who=who, extra=extra)


def test_every_real_test_caption_scored_against_itself_is_right_on_every_attribute():
    test = load_caption_pool()["test"]
    assert len(test) == 2538
    scores = attribute_accuracy(test, test)
    assert scores["images"] == 2538 and scores["macro"] == 1.0
    assert set(scores["per_attribute"].values()) == {1.0} and set(scores["per_attribute"]) == set(ATTRIBUTES)


def test_planted_errors_give_exact_fractions():
    refs = {f"img{i}": caption(sleeve="long" if i % 2 else "short") for i in range(10)}
    hyps = dict(refs)
    for i in range(0, 10, 2):  # every sleeve flipped on half the images
        hyps[f"img{i}"] = caption(sleeve="long")
    hyps["img1"] = caption(extra=" There is a hat in her head.")  # an extra hat on one image
    hyps["img3"] = caption(who="gentleman")  # wrong gender on one
    scores = attribute_accuracy(refs, hyps)["per_attribute"]
    assert scores["sleeve"] == 0.5 and scores["hat"] == 0.9 and scores["gender"] == 0.9
    assert all(v == 1.0 for k, v in scores.items() if k not in ("sleeve", "hat", "gender"))
    assert attribute_accuracy(refs, hyps)["macro"] == pytest.approx((len(ATTRIBUTES) - 0.7) / len(ATTRIBUTES))


def test_a_caption_that_leaves_a_stated_attribute_out_is_wrong_on_it():
    ref = caption(extra=" There is a belt on her waist.")
    marks = {m["attribute"]: m for m in caption_marks(ref, caption(sleeve="short"))}
    assert marks["waist"]["status"] == "missed" and marks["waist"]["expected"] == "belt"
    assert marks["sleeve"]["status"] == "wrong" and marks["sleeve"]["stated"] == "short"
    assert marks["lower_pattern"]["status"] == "right" and "hat" not in marks  # neither states a hat
    assert attribute_accuracy({"a": ref}, {"a": caption()})["per_attribute"]["waist"] == 0.0


def test_synonym_nouns_count_as_the_label_they_imply():
    tank = "The lady wears a tank top with cotton fabric and solid color patterns."
    sleeveless = "The lady wears a sleeveless upper clothing with cotton fabric and solid color patterns."
    assert caption_labels(tank)["sleeve"] == caption_labels(sleeveless)["sleeve"] == "sleeveless"
    shorts = caption().replace("long trousers", "three-point shorts").replace("The trousers", "The shorts")
    pants = caption().replace("long trousers", "three-point pants").replace("The trousers", "The pants")
    skirt = caption().replace("long trousers", "three-point skirt").replace("The trousers", "The skirt")
    assert caption_labels(shorts) == caption_labels(pants)  # shorts / pants are synonyms
    assert caption_labels(skirt)["lower_kind"] == "skirt" != caption_labels(pants)["lower_kind"]


def test_majority_baseline_equals_a_hand_count():
    train = [caption(sleeve="long")] * 3 + [caption(sleeve="short", extra=" There is a hat in her head.")] * 2
    values = majority_values(train)
    assert values["sleeve"] == "long" and values["hat"] == ABSENT and values["gender"] == "female"
    test = {"a": caption(sleeve="short"), "b": caption(sleeve="short"), "c": caption(sleeve="long"),
            "d": caption(sleeve="long", extra=" There is a hat in her head.")}
    b = majority_baseline(train, test)
    # by hand: sleeve "long" right on c, d (2/4); hat absent right on a, b, c (3/4); every other attribute right
    assert b["per_attribute"]["sleeve"] == 0.5 and b["per_attribute"]["hat"] == 0.75
    assert b["macro"] == pytest.approx((len(ATTRIBUTES) - 0.75) / len(ATTRIBUTES))


def _trained_student(tmp_path, informative: bool):
    """A small GRU captioner (image vector fed at every step) on features that encode the sleeve and the hat (or
    are all zero)."""
    from pipeline.core.config import StudentsConfig
    from pipeline.students.train import train_student
    from pipeline.students.vocab import Vocabulary

    torch.manual_seed(0)
    combos = [(s, h) for s in ("long", "short") for h in (False, True)]
    captions, feats = {}, {}
    for split, n in (("train", 96), ("val", 8), ("test", 40)):
        picks = [combos[i % 4] for i in range(n)]
        captions[split] = [caption(sleeve=s, extra=" There is a hat in her head." if h else "") for s, h in picks]
        onehot = torch.eye(4)[[combos.index(p) for p in picks]]
        feats[split] = (onehot + 0.05 * torch.randn(n, 4)) if informative else torch.zeros(n, 4)
    cfg = StudentsConfig(embed_dim=16, hidden_dim=32, dropout=0.0, epochs=12, batch_size=16, decoder_lr=1e-2,
                         val_every_epochs=6, max_length=40, min_word_count=1)
    vocab = Vocabulary.build(captions["train"], 1)

    class CiderFree:  # validation by attribute accuracy: no Java needed here
        def score(self, refs, hyps, only=None):
            return {"CIDEr-D": attribute_accuracy({k: v[0] for k, v in refs.items()}, hyps)["macro"]}

    features = lambda split, idx: feats[split][idx]  # noqa: E731
    train_student("resnet101_gru", cfg, features, 4, captions, vocab, tmp_path, 0, CiderFree())
    return cfg, features, captions["test"]


@pytest.mark.parametrize("informative", [True, False])
def test_image_reliance_drops_only_for_a_student_that_reads_the_image(tmp_path, informative):
    from pipeline.students.checkpoint import load_decoder
    from pipeline.students.train import decode_split
    from pipeline.workflows.students import permuted_images

    cfg, features, test = _trained_student(tmp_path, informative)
    model, vocab, _ = load_decoder(tmp_path / "best")
    refs = {str(i): c for i, c in enumerate(test)}

    def accuracy(fn):
        hyps = decode_split(model, fn, "test", len(test), vocab, 2, cfg.max_length)
        return attribute_accuracy(refs, {str(i): h for i, h in enumerate(hyps)})["per_attribute"]

    seen, withheld = accuracy(features), accuracy(permuted_images(features, "test", len(test)))
    if informative:
        assert seen["sleeve"] == seen["hat"] == 1.0
        assert withheld["sleeve"] < 0.8 and withheld["hat"] < 0.8  # about chance with the images swapped
    else:
        assert seen == withheld  # no image signal: swapping images changes nothing


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from pipeline.core.config import load_config
    from pipeline.data.formats import load_captions, split_rows
    from stages import prepare
    from tests.helpers import write_config

    path = write_config(tmp_path_factory.mktemp("evaluate"))
    cfg = load_config(path)
    prepare.run(cfg, Namespace(force=False))
    return path, split_rows(load_captions(cfg.run_dir / "data" / "captions"), "test")


def test_predictions_read_from_every_format(prepared, tmp_path):
    _, test = prepared
    expected = {r["image_id"]: f"caption {i}" for i, r in enumerate(test)}
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"image_id": k, "caption": v}) + "\n"
                                              for k, v in expected.items()))
    (tmp_path / "p.json").write_text(json.dumps(expected))
    (tmp_path / "list.json").write_text(json.dumps([{"id": k, "text": v} for k, v in expected.items()]))
    names = {r["image_id"]: r["image_path"].rsplit("/", 1)[-1] for r in test}
    with open(tmp_path / "p.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name", "caption"])
        writer.writerows([names[k], v] for k, v in expected.items())
    for name in ("p.jsonl", "p.json", "list.json", "p.csv"):
        assert read_predictions(tmp_path / name, test) == expected, name


def test_predictions_of_copied_test_images_match_by_file_name(prepared, tmp_path):
    """`make caption` on copies of the test images writes their copies' paths: matched by file name."""
    _, test = prepared
    copies = tmp_path / "copies"
    rows = [{"path": str(copies / Path(r["image_path"]).name), "caption": f"caption {i}", "attributes": {}}
            for i, r in enumerate(test)]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_predictions(tmp_path / "captions.jsonl", test) == {r["image_id"]: f"caption {i}"
                                                                   for i, r in enumerate(test)}
    twin = {**test[1], "image_id": "twin", "image_path": "/other/folder/" + Path(test[0]["image_path"]).name}
    with pytest.raises(PredictionsError, match="line 1: file name of .* names 2 test images .*use the image id"):
        read_predictions(tmp_path / "captions.jsonl", [*test, twin])


@pytest.mark.parametrize("content, suffix, message", [
    ('{"image_id": "nope", "caption": "a"}\n', ".jsonl", "line 1: image 'nope' is not in the test split"),
    ('{"image_id": "{first}", "caption": ""}\n', ".jsonl", "line 1 ({first}): the caption is empty"),
    ('{"image_id": "{first}", "caption": 3}\n', ".jsonl", "line 1 ({first}): the caption is int"),
    ('{"caption": "a"}\n', ".jsonl", "line 1: no image id"),
    ('{"image_id": "{first}", "caption": "a"}\n{oops\n', ".jsonl", "line 2 is not valid JSON"),
    ('[1, 2]', ".json", "item 0: expected an object"),
    ('{"{first}": null}', ".json", "no caption"),
    ('image,caption\n{first},\n', ".csv", "row 2 ({first}): the caption is empty"),
    ('x', ".txt", "unknown predictions format '.txt'"),
    ("[" * 100_000 + "]" * 100_000, ".json", ": nested 100000 levels deep at column 100000, deeper than Python's"),
    ('{"image_id": "{first}", "caption": "a"}\n' + "[" * 100_000 + "]" * 100_000, ".jsonl",
     ": line 2: nested 100000 levels deep at column 100000"),
    ('[\n{"image_id": 1' + "7" * 4999 + ', "caption": "a"}]', ".json",
     ": a number of 5000 digits at line 2 column 14, more than Python reads (4300)"),
    ('{"image_id": 1' + "7" * 4999 + ', "caption": "a"}', ".jsonl", ": line 1: a number of 5000 digits at column 14"),
    ("image,caption\n1" + "7" * 4999 + ",a\n", ".csv", "row 2: image '17777777777777777777777777777777777777"
     "77'... (5000 characters) is not in the test split"),
    ('image,caption\n{first},"' + "a" * 140_000 + '"\n', ".csv", ": row 2: field larger than field limit (131072)"),
    ('image,"' + "a" * 140_000 + '"\n', ".csv", ": row 1: field larger than field limit (131072)"),
    ('{"image_id": "{first}", "caption": "' + "word " * 24_000 + '"}', ".jsonl",
     ": line 1 ({first}): the caption has 24000 words, more than a caption has (1000)"),
])
def test_bad_predictions_fail_naming_file_and_record(prepared, tmp_path, content, suffix, message):
    _, test = prepared
    first = test[0]["image_id"]
    path = tmp_path / f"pred{suffix}"
    path.write_text(content.replace("{first}", first))
    with pytest.raises(PredictionsError) as err:
        read_predictions(path, test)
    assert str(err.value).startswith(str(path)) and message.replace("{first}", first) in str(err.value)


@pytest.mark.parametrize("suffix, content", [(".csv", "image_id,caption\n{first},a lady\n"),
                                             (".json", '{"{first}": "a lady"}'),
                                             (".jsonl", '{"image_id": "{first}", "caption": "a lady"}\n')])
def test_a_byte_order_mark_is_not_part_of_the_file(prepared, tmp_path, suffix, content):
    """Spreadsheets save CSV with a UTF-8 byte order mark: the header's first name is still `image_id`."""
    _, test = prepared
    first = test[0]["image_id"]
    path = tmp_path / f"pred{suffix}"
    path.write_text("\ufeff" + content.replace("{first}", first), encoding="utf-8")
    assert read_predictions(path, test, allow_missing=True) == {first: "a lady"}


def test_missing_test_images_are_counted_or_allowed(prepared, tmp_path):
    _, test = prepared
    path = tmp_path / "some.json"
    path.write_text(json.dumps({r["image_id"]: "a lady" for r in test[:-2]}))
    with pytest.raises(PredictionsError, match=f"2 of {len(test)} test images have no prediction .*--allow-missing"):
        read_predictions(path, test)
    assert len(read_predictions(path, test, allow_missing=True)) == len(test) - 2
    with pytest.raises(PredictionsError, match="cannot read"):
        read_predictions(tmp_path / "absent.jsonl", test)


@pytest.mark.slow
def test_evaluate_stage_scores_a_file_and_fails_in_one_line(prepared, tmp_path):
    from tests.helpers import run_stage

    path, test = prepared
    pred = tmp_path / "run a" / "preds.jsonl"  # a folder name with a space
    pred.parent.mkdir()
    pred.write_text("".join(json.dumps({"image_id": r["image_id"], "caption": r["caption"]}) + "\n" for r in test))
    res = run_stage("evaluate", "--config", str(path), "--pred", str(pred))
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "run a" / "preds.eval.json").read_text())
    assert result["attributes"]["macro"] == 1.0 and result["test"]["CIDEr-D"] > 5  # the references themselves
    assert result["scored_images"] == len(test) and 0 < result["majority_attributes"]["macro"] < 1
    assert "attributes (macro)" in res.stdout and "majority baseline" in res.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image_id": "x", "caption": "a"}\n')
    res = run_stage("evaluate", "--config", str(path), "--pred", str(bad))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"evaluate: error: {bad}: line 1: image 'x' is not in the test split"]
