"""Self-critical sequence training (pipeline/students/scst.py): its CIDEr-D reward against pycocoevalcap, the
new-SCST baseline, sampling and the policy-gradient loss on every architecture, a toy task it improves."""

from __future__ import annotations

import json
import random

import pytest
import torch
from pycocoevalcap.cider.cider_scorer import CiderScorer

from pipeline.core.config import StudentsConfig
from pipeline.data.text import tokenize
from pipeline.students.beam import sample_decode
from pipeline.students.decoders import build_decoder
from pipeline.students.scst import CiderD, Reward, advantages, run_scst, scst_loss
from tests.helpers import SMALL

ARCH_FEATS = {"vgg19_gru": (32,), "resnet101_gru": (48,), "resnet101_attn_gru": (9, 48), "vit_transformer": (5, 24)}
CLASSES = ["the lady wears a short-sleeve shirt with pure color patterns . it is cotton fabric .",
           "the gentleman wears a long-sleeve sweater with stripe patterns . the sweater is denim .",
           "this woman wears a tank top and a long skirt . the skirt is with floral patterns .",
           "the person wears a long-sleeve shirt and long pants . there is a hat in his head ."]


def test_cider_d_equals_pycocoevalcaps_with_the_same_references():
    """With the document frequencies of the references being scored, CiderD gives CiderScorer's per-image scores."""
    refs = {str(i): [c, CLASSES[(i + 1) % 4]] for i, c in enumerate(CLASSES)}
    hyps = {"0": CLASSES[0], "1": "the gentleman wears a sweater .", "2": CLASSES[3], "3": "a hat ."}
    coco = CiderScorer()
    for k in refs:
        coco += (hyps[k], refs[k])
    _, expected = coco.compute_score()
    ours = CiderD({k: [c.split() for c in v] for k, v in refs.items()})
    assert [ours.score(k, hyps[k].split()) for k in refs] == pytest.approx(list(expected), rel=1e-9)


def test_a_sample_equal_to_the_reference_earns_more_than_a_shuffled_one():
    rows = [{"image_id": str(i), "caption": c} for i, c in enumerate(CLASSES)]
    for weight in (0.0, 1.0):
        reward = Reward(rows, attribute_weight=weight)
        for i, caption in enumerate(CLASSES):
            words = tokenize(caption)
            random.Random(i).shuffle(words)
            assert reward(str(i), caption) > reward(str(i), " ".join(words)) + 0.5, (weight, caption)
    # the attribute term counts: the same words, another image's attributes
    with_attributes, without = Reward(rows, 1.0), Reward(rows, 0.0)
    assert with_attributes("0", CLASSES[0]) == pytest.approx(without("0", CLASSES[0]) + 1.0)


def test_the_baseline_makes_the_mean_advantage_zero_per_image():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0], [5.0, 5.0, 5.0]])
    adv = advantages(rewards)
    assert adv.mean(1) == pytest.approx(torch.zeros(3), abs=1e-6)
    # each sample against the mean of its image's others: 1 - (2 + 6) / 2 = -3
    assert adv[0].tolist() == pytest.approx([-3.0, -1.5, 4.5]) and adv[2].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("arch", sorted(ARCH_FEATS))
def test_every_architecture_samples_and_learns_by_policy_gradient(arch):
    torch.manual_seed(0)
    model = build_decoder(arch, ARCH_FEATS[arch][-1], 30, SMALL).eval()
    feats = torch.randn(4, *ARCH_FEATS[arch])
    draws = [sample_decode(model, feats, 12, 1, 2, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])  # seeded, and random
    samples = draws[0]
    for row in samples.tolist():
        ended = row.index(2) if 2 in row else len(row)
        assert all(t not in (0, 1, 2) for t in row[:ended])  # neither padding nor <start> is ever drawn
        assert all(t == 0 for t in row[ended + 1:])  # padding after <end>
    # the loss is -advantage x the samples' mean token log-probability; a step on it raises that log-probability
    def mean_logp() -> float:
        inputs = torch.cat([torch.ones_like(samples[:, :1]), samples[:, :-1]], 1)
        logp = torch.log_softmax(model(feats, inputs, (inputs != 0).float())[0], -1)
        mask = samples != 0
        return logp.gather(-1, samples[..., None])[..., 0][mask].mean().item()

    before = mean_logp()
    assert scst_loss(model, feats, samples, torch.ones(4), 1).item() == pytest.approx(-before, rel=1e-5)
    scst_loss(model, feats, samples, torch.ones(4), 1).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    assert mean_logp() > before


def _toy(n: int, seed: int) -> tuple[list[int], torch.Tensor]:
    classes = [i % 4 for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    return classes, torch.eye(4)[classes] + 0.05 * torch.randn(n, 4, generator=g)


def test_scst_raises_validation_cider_on_a_toy_task(tmp_path):
    """A GRU captioner cross-entropy-trained for 24 steps (it drops words: "a tank top a long skirt."), then SCST
    (default reward: CIDEr-D + 1 x attribute agreement): validation CIDEr-D (ground truth) rises by more than 1."""
    from pipeline.evaluation.metrics import CaptionScorer
    from pipeline.students.train import train_student
    from pipeline.students.vocab import Vocabulary

    train_classes, train_feats = _toy(64, 0)
    val_classes, val_feats = _toy(8, 1)
    feats = {"train": train_feats, "val": val_feats}
    captions = {"train": [CLASSES[c] for c in train_classes], "val": [CLASSES[c] for c in val_classes]}
    cfg = StudentsConfig(embed_dim=16, hidden_dim=32, dropout=0.0, epochs=6, batch_size=16, decoder_lr=1e-2,
                         val_every_epochs=6, max_length=24, min_word_count=1, select_on="CIDEr-D",
                         scst={"epochs": 2, "samples": 5, "lr": 1e-3, "batch_size": 4})
    vocab = Vocabulary.build(captions["train"], 1)
    features = lambda split, idx: feats[split][idx]  # noqa: E731
    rows = [{"image_id": f"img{i}", "caption": c} for i, c in enumerate(captions["train"])]
    with CaptionScorer(meteor=False) as scorer:
        ce = train_student("vgg19_gru", cfg, features, 4, captions, vocab, tmp_path, 0, scorer)
        result = run_scst("vgg19_gru", cfg, features, 4, rows, captions["val"], vocab, tmp_path, 0, scorer)
    curve = [v for _, v in result["curves"]["val_cider"]]
    assert result["best_val_cider"] > ce["best_val_cider"] + 1.0, (ce["best_val_cider"], curve)
    assert result["selected"] == "scst"
    best = json.loads((tmp_path / "best" / "student.json").read_text())
    assert best["scst"]["epoch"] == result["best_epoch"]
    assert json.loads((tmp_path / "cross_entropy" / "student.json").read_text())["val_cider"] == ce["best_val_cider"]


class GuardedRow(dict):
    """A test row that records reads of its caption while a model trains."""

    training = False
    reads: list[str] = []

    def __getitem__(self, key):
        if key == "caption" and GuardedRow.training:
            GuardedRow.reads.append(dict.__getitem__(self, "image_id"))
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        return self[key] if key in self else default


def test_students_stage_with_scst_and_seeds_never_reads_a_test_caption_while_training(make_config, monkeypatch):
    """The students stage with SCST on and two seeds: one folder per seed (the first keeps the plain name), the
    cross-entropy and SCST checkpoints' test figures side by side, per-image scores; no test caption is read from
    the start of a model's experiment until its trained best/ is loaded for scoring (cross-entropy and SCST)."""
    from argparse import Namespace

    import stages.students as stage
    from pipeline.core.config import load_config
    from pipeline.workflows import students as workflow
    from stages import prepare

    path = make_config(students={"archs": ["vgg19_gru"], "epochs": 2, "batch_size": 16, "beam_size": 2,
                                 "val_every_epochs": 2, "seeds": [0, 3],
                                 "scst": {"epochs": 1, "samples": 3, "batch_size": 8},
                                 "encoder": {"pretrained": False, "width": 0.125, "image_size": 32}})
    cfg = load_config(path)
    prepare.run(cfg, Namespace(force=False))
    load_splits = stage.load_splits

    def guarded_splits(folder):
        splits = load_splits(folder)
        return {**splits, "test": [GuardedRow(r) for r in splits["test"]]}

    def experiment(*args, **kwargs):  # a model's training starts here and ends when its best/ is loaded to score
        GuardedRow.training = True
        try:
            return run_experiment(*args, **kwargs)
        finally:
            GuardedRow.training = False

    def scoring(*args, **kwargs):
        GuardedRow.training = False
        return load_student(*args, **kwargs)

    run_experiment, load_student = stage.run_experiment, workflow.load_student
    GuardedRow.reads = []
    monkeypatch.setattr(stage, "load_splits", guarded_splits)
    monkeypatch.setattr(stage, "run_experiment", experiment)
    monkeypatch.setattr(workflow, "load_student", scoring)
    stage.run(cfg, Namespace(force=False, wait=False))
    assert GuardedRow.reads == []
    out = cfg.run_dir / "students"
    assert sorted(p.name for p in out.glob("vgg19_gru__*")) == ["vgg19_gru__gt", "vgg19_gru__gt__s3"]
    for folder, seed in (("vgg19_gru__gt", 0), ("vgg19_gru__gt__s3", 3)):
        metrics = json.loads((out / folder / "metrics.json").read_text())
        assert metrics["seed"] == seed and metrics["scst_training"]["epochs_run"] == 1
        assert {"CIDEr-D", "BLEU-4"} <= set(metrics["cross_entropy"]["test"]) and "macro" in metrics["scst"][
            "attributes"]
        chosen = metrics[metrics["scst_training"]["selected"]]
        assert chosen["test"] == metrics["test"]  # best/ is the checkpoint validation picked
        per_image = json.loads((out / folder / "per_image.json").read_text())
        assert set(per_image) == {"best", "cross_entropy", "scst"}
        assert len(per_image["best"]) == metrics["test_images"]
        assert sum(v["CIDEr-D"] for v in per_image["best"].values()) / metrics["test_images"] == pytest.approx(
            metrics["test"]["CIDEr-D"])
    seeds = [json.loads((out / f / "best" / "student.json").read_text())["seed"]
             for f in ("vgg19_gru__gt", "vgg19_gru__gt__s3")]
    assert seeds == [0, 3]


def test_scst_killed_mid_epoch_resumes_from_scst_last_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Two SCST epochs after one cross-entropy training: straight through, and killed during the second epoch (after
    its steps, before its scst_last/) then run again. The rerun resumes from scst_last/ (the first epoch is not
    trained again) and ends with the same steps, curves, choice and weights."""
    import shutil

    from safetensors.torch import load_file

    import pipeline.students.scst as scst
    from pipeline.evaluation.metrics import CaptionScorer
    from pipeline.students.train import train_student
    from pipeline.students.vocab import Vocabulary

    train_classes, train_feats = _toy(32, 0)
    val_classes, val_feats = _toy(8, 1)
    feats = {"train": train_feats, "val": val_feats}
    captions = {"train": [CLASSES[c] for c in train_classes], "val": [CLASSES[c] for c in val_classes]}
    cfg = StudentsConfig(embed_dim=16, hidden_dim=32, dropout=0.0, epochs=2, batch_size=16, decoder_lr=1e-2,
                         max_length=24, min_word_count=1, select_on="CIDEr-D",
                         scst={"epochs": 2, "samples": 3, "lr": 1e-3, "batch_size": 8})
    vocab = Vocabulary.build(captions["train"], 1)
    features = lambda split, idx: feats[split][idx]  # noqa: E731
    rows = [{"image_id": f"img{i}", "caption": c} for i, c in enumerate(captions["train"])]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    validate, calls = scst.validation_scores, []

    def killed_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return validate(*args, **kwargs)

    with CaptionScorer(meteor=False) as scorer:
        train_student("vgg19_gru", cfg, features, 4, captions, vocab, straight, 0, scorer)
        shutil.copytree(straight, crashed)
        expected = run_scst("vgg19_gru", cfg, features, 4, rows, captions["val"], vocab, straight, 0, scorer)
        monkeypatch.setattr(scst, "validation_scores", killed_in_epoch_two)
        with pytest.raises(KeyboardInterrupt):
            run_scst("vgg19_gru", cfg, features, 4, rows, captions["val"], vocab, crashed, 0, scorer)
        state = json.loads((crashed / "scst_last" / "state.json").read_text())
        assert state["epoch"] == 1 and state["step"] == 4  # 32 images / 8 a step
        monkeypatch.setattr(scst, "validation_scores", validate)
        steps, sample = [], scst.sample_decode
        monkeypatch.setattr(scst, "sample_decode", lambda *a: (steps.append(1), sample(*a))[1])
        resumed = run_scst("vgg19_gru", cfg, features, 4, rows, captions["val"], vocab, crashed, 0, scorer)
    assert len(steps) == 4  # only the second epoch's batches are sampled and trained again
    assert resumed == expected and resumed["steps"] == 8 and resumed["epochs_run"] == 2
    for folder in ("scst", "scst_last", "best"):
        a, b = load_file(straight / folder / "model.safetensors"), load_file(crashed / folder / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
