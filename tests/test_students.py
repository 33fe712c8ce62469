import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from pipeline.core.archs import display_name
from pipeline.core.config import EncoderSettings, StudentsConfig, load_config
from pipeline.core.rundir import read_manifest, sha256_file
from pipeline.evaluation.metrics import CaptionScorer
from pipeline.reporting.cards import front_matter
from pipeline.students import features as features_mod
from pipeline.students.beam import beam_search, greedy_decode
from pipeline.students.checkpoint import load_student
from pipeline.students.decoders import build_decoder
from pipeline.students.train import caption_loss, epoch_batches, train_student
from pipeline.students.vocab import Vocabulary
from stages import prepare, students

ARCH_FEATS = {"vgg19_gru": (32,), "resnet101_gru": (48,), "resnet101_attn_gru": (9, 48), "vit_transformer": (5, 24)}
# the tests' scorers script validation CIDEr-D: select on it (test_selection_on_validation_attributes_or_cider covers
# both)
SMALL = StudentsConfig(embed_dim=16, hidden_dim=32, transformer_heads=4, transformer_layers=2, max_length=12,
                       dropout=0.0, select_on="CIDEr-D")


def test_vocabulary_round_trip(tmp_path):
    caps = ["The lady wears a t-shirt, with cotton fabric.", "The lady wears a hat.", "A v-shape neckline."]
    vocab = Vocabulary.build(caps, min_count=1)
    ids = vocab.encode(caps[0], max_length=50)
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert vocab.decode(ids) == "the lady wears a t-shirt, with cotton fabric."
    vocab.save(tmp_path / "v.json")
    again = Vocabulary.load(tmp_path / "v.json")
    assert again.itos == vocab.itos and again.encode(caps[1], 50) == vocab.encode(caps[1], 50)
    rare = Vocabulary.build(caps, min_count=2)
    assert "hat" not in rare.stoi and rare.encode("a hat", 5)[2] == rare.unk_id
    assert len(vocab.encode(caps[0], max_length=3)) == 5  # 3 words + start + end


def test_masked_loss_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[3, 4, 2, 0, 0], [5, 6, 4, 3, 2]])
    loss = caption_loss(logits, targets)
    changed = logits.clone()
    changed[0, 3:] = 100 * torch.randn(2, 7)  # whatever the model says at padded positions
    assert torch.allclose(caption_loss(changed, targets), loss)
    mask = targets != 0
    manual = -torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0][mask].mean()
    assert torch.allclose(loss, manual)


def test_length_grouped_batches_cover_every_caption_once_with_less_padding():
    lengths = torch.randint(8, 90, (1127,), generator=torch.Generator().manual_seed(0)).tolist()

    def padded(batches):  # the decoder steps an epoch runs: every batch to its longest caption
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    epochs = [epoch_batches(lengths, 32, torch.Generator().manual_seed(e), True) for e in (0, 1)]
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert max(len(b) for b in batches) == 32
        random = epoch_batches(lengths, 32, torch.Generator().manual_seed(0), False)
        assert padded(batches) < 0.8 * padded(random)
        longest = [max(lengths[i] for i in b) for b in batches]
        assert longest != sorted(longest, reverse=True)  # batches come in random order, not longest first
    assert epochs[0] == epoch_batches(lengths, 32, torch.Generator().manual_seed(0), True)  # seeded
    assert {tuple(sorted(b)) for b in epochs[0]} != {tuple(sorted(b)) for b in epochs[1]}  # new batches each epoch


@pytest.mark.parametrize("arch", sorted(ARCH_FEATS))
def test_beam_of_one_equals_greedy_and_beams_are_valid(arch):
    torch.manual_seed(1)
    shape = ARCH_FEATS[arch]
    model = build_decoder(arch, shape[-1], 30, SMALL).eval()
    feats = torch.randn(6, *shape)
    greedy = greedy_decode(model, feats, 12, start_id=1, end_id=2)
    assert beam_search(model, feats, 1, 12, start_id=1, end_id=2) == greedy
    beams = beam_search(model, feats, 4, 12, start_id=1, end_id=2)
    assert len(beams) == 6 and all(len(b) <= 13 and 2 not in b for b in beams)


class _EndsAfter(torch.nn.Module):
    """A toy decoder: image i's captions may end after ``feats[i, 0]`` words (a large value: never)."""

    def __init__(self):
        super().__init__()
        self.out = torch.nn.Linear(4, 30)

    def init_state(self, feats):
        return {"x": feats[:, 1:], "left": feats[:, :1].clone()}

    def step(self, state, tokens):
        logits = self.out(state["x"] * (tokens[:, None] % 5 + 1))
        logits[:, 2] = torch.where(state["left"][:, 0] <= 0, 10.0, float("-inf"))  # <end> as soon as allowed
        return torch.log_softmax(logits, -1), {**state, "left": state["left"] - 1}


def test_beam_search_of_a_batch_equals_each_image_alone():
    """Images whose beams have all ended leave the batch early: their captions, and those of the images still being
    decoded (one never ends before max_length), are what each image gets when decoded on its own."""
    torch.manual_seed(3)
    model = _EndsAfter()
    feats = torch.randn(7, 5)
    feats[:, 0] = torch.tensor([3.0, 0.0, 8.0, 1.0, 100.0, 5.0, 2.0])
    batch = beam_search(model, feats, 3, 12, start_id=1, end_id=2)
    assert batch == [beam_search(model, feats[i:i + 1], 3, 12, start_id=1, end_id=2)[0] for i in range(len(feats))]
    assert len(batch[4]) == 13 and len({len(c) for c in batch}) >= 4, batch  # ended at several steps, one never


@pytest.mark.parametrize("arch", sorted(ARCH_FEATS))
def test_incremental_step_matches_full_forward(arch):
    """A decoding step (the attention GRU's and the Transformer's with cached self-attention keys and values) gives
    the log-probabilities of the teacher-forced forward pass."""
    torch.manual_seed(2)
    shape = ARCH_FEATS[arch]
    model = build_decoder(arch, shape[-1], 30, SMALL).eval()
    feats, tokens = torch.randn(3, *shape), torch.randint(3, 30, (3, 9))
    with torch.no_grad():
        full = torch.log_softmax(model(feats, tokens)[0], -1)
        state, steps = model.init_state(feats), []
        for t in range(tokens.shape[1]):
            logp, state = model.step(state, tokens[:, t])
            steps.append(logp)
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)


def test_feature_cache_reuses_and_invalidates(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    noise = lambda: Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))  # noqa: E731
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        noise().save(p)
        paths.append(str(p))
    calls = []
    real = features_mod.compute_features
    monkeypatch.setattr(features_mod, "compute_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    settings = EncoderSettings(width=0.125, image_size=32)
    cache = tmp_path / "cache"
    first, index = features_mod.cached_features(cache, "vgg19", settings, 0, paths)
    again, _ = features_mod.cached_features(cache, "vgg19", settings, 0, paths)
    assert len(calls) == 1 and torch.equal(first, again) and index[paths[2]] == 2
    features_mod.cached_features(cache, "vgg19", EncoderSettings(width=0.25, image_size=32), 0, paths)
    assert len(calls) == 2  # another encoder shape
    noise().save(paths[1])  # an image changed
    changed, _ = features_mod.cached_features(cache, "vgg19", settings, 0, paths)
    assert len(calls) == 3 and not torch.equal(changed[1], first[1]) and torch.allclose(changed[0], first[0])
    assert len(list(cache.glob("*.safetensors"))) == 3


class _Crash(Exception):
    pass


def test_training_resumes_after_a_crash(tmp_path):
    torch.manual_seed(0)
    caps = {"train": [f"the lady wears a {c} hat ." for c in ("red", "blue", "green", "big")] * 8,
            "val": ["the lady wears a red hat ."] * 4}
    vocab = Vocabulary.build(caps["train"], 1)
    table = {"train": torch.randn(32, 16), "val": torch.randn(4, 16)}
    feats = lambda split, idx: table[split][idx]  # noqa: E731
    cfg = SMALL.model_copy(update={"epochs": 4, "batch_size": 8, "val_every_epochs": 1, "early_stop_patience": 9})

    class CrashingScorer:
        calls = 0

        def score(self, refs, hyps, only=None):
            CrashingScorer.calls += 1
            if CrashingScorer.calls == 3:
                raise _Crash  # dies during epoch 3's validation, after epoch 2's checkpoint
            return {"CIDEr-D": float(CrashingScorer.calls)}

    with pytest.raises(_Crash):
        train_student("vgg19_gru", cfg, feats, 16, caps, vocab, tmp_path, 0, CrashingScorer())
    state = json.loads((tmp_path / "last" / "state.json").read_text())
    assert state["epoch"] == 2 and state["step"] == 8
    result = train_student("vgg19_gru", cfg, feats, 16, caps, vocab, tmp_path, 0, CrashingScorer())
    assert result["epochs_run"] == 4 and result["steps"] == 16
    assert [s for s, _ in result["curves"]["val_cider"]] == [4, 8, 12, 16]
    assert (tmp_path / "best" / "model.safetensors").is_file()


def test_validation_every_n_steps_and_early_stopping(tmp_path):
    caps = {"train": [f"the lady wears a {c} hat ." for c in ("red", "blue", "green", "big")] * 8,
            "val": ["the lady wears a red hat ."] * 4}
    vocab = Vocabulary.build(caps["train"], 1)
    table = {"train": torch.randn(32, 16), "val": torch.randn(4, 16)}
    feats = lambda split, idx: table[split][idx]  # noqa: E731

    class Scorer:
        def __init__(self, values):
            self.values = iter(values)

        def score(self, refs, hyps, only=None):
            return {"CIDEr-D": next(self.values)}

    # 4 steps per epoch, 3 epochs: validations at steps 3, 6, 9, 12; the best (0.9) is step 6's
    cfg = SMALL.model_copy(update={"epochs": 3, "batch_size": 8, "val_every_steps": 3, "early_stop_patience": 9})
    result = train_student("vgg19_gru", cfg, feats, 16, caps, vocab, tmp_path / "a", 0, Scorer([.1, .9, .5, .2]))
    assert [s for s, _ in result["curves"]["val_cider"]] == [3, 6, 9, 12]
    assert result["best_step"] == 6 and result["best_epoch"] == 1.5 and result["steps"] == 12
    assert json.loads((tmp_path / "a" / "best" / "student.json").read_text())["step"] == 6
    # early stopping: two validations without improvement after the best stop the run mid-epoch
    cfg = cfg.model_copy(update={"epochs": 10, "val_every_steps": 2, "early_stop_patience": 2})
    result = train_student("vgg19_gru", cfg, feats, 16, caps, vocab, tmp_path / "b", 0, Scorer([.5, .4, .3, 1.0]))
    assert [s for s, _ in result["curves"]["val_cider"]] == [2, 4, 6] and result["steps"] == 6
    assert result["best_step"] == 2 and result["epochs_run"] == 2


@pytest.mark.parametrize("select_on, best_step", [("attributes", 8), ("CIDEr-D", 6)])
def test_selection_on_validation_attributes_or_cider(tmp_path, monkeypatch, select_on, best_step):
    """best/ is the checkpoint with the best validation ``select_on``; a tie goes to the other metric."""
    from pipeline.students import train

    caps = {"train": [f"the lady wears a {c} hat ." for c in ("red", "blue", "green", "big")] * 8,
            "val": ["the lady wears a red hat ."] * 4}
    vocab = Vocabulary.build(caps["train"], 1)
    table = {"train": torch.randn(32, 16), "val": torch.randn(4, 16)}
    attributes, cider = iter([.5, .9, .7, .9]), iter([.1, .2, .9, .8])  # validations at steps 2, 4, 6, 8

    class Scorer:
        def score(self, refs, hyps, only=None):
            return {"CIDEr-D": next(cider)}

    monkeypatch.setattr(train, "attribute_accuracy", lambda refs, hyps: {"macro": next(attributes)})
    cfg = SMALL.model_copy(update={"epochs": 2, "batch_size": 8, "val_every_steps": 2, "early_stop_patience": 9,
                                   "select_on": select_on})
    result = train_student("vgg19_gru", cfg, lambda split, idx: table[split][idx], 16, caps, vocab, tmp_path, 0,
                           Scorer())
    assert result["best_step"] == best_step and result["selected_on"] == select_on
    assert [v for _, v in result["curves"]["val_attributes"]] == [.5, .9, .7, .9]
    saved = json.loads((tmp_path / "best" / "student.json").read_text())
    assert saved["step"] == best_step and saved["val_attributes"] == {8: .9, 6: .7}[best_step]


def test_fine_tuned_encoder_is_trained_checkpointed_and_resumed_exactly(tmp_path):
    """A crash + resume with the encoder in the loop ends where an uninterrupted run does (decoder, encoder,
    optimizer of both), and best/ holds the encoder weights that go with the best decoder."""
    from safetensors.torch import load_file

    caps = {"train": [f"the lady wears a {c} hat ." for c in ("red", "blue", "green", "big")] * 8,
            "val": ["the lady wears a red hat ."] * 4}
    vocab = Vocabulary.build(caps["train"], 1)
    images = {"train": torch.randn(32, 8), "val": torch.randn(4, 8)}
    cfg = SMALL.model_copy(update={"epochs": 4, "batch_size": 8, "val_every_epochs": 1, "early_stop_patience": 9,
                                   "encoder_lr": 1e-2})

    class Scorer:
        def __init__(self, crash_at=None):
            self.calls, self.crash_at = 0, crash_at

        def score(self, refs, hyps, only=None):
            self.calls += 1
            if self.calls == self.crash_at:
                raise _Crash
            return {"CIDEr-D": [0.1, 0.5, 0.3, 0.2][self.calls - 1]}  # epoch 2 is the best

    def run(out, scorer):
        torch.manual_seed(0)
        encoder = torch.nn.Linear(8, 16)
        initial = {k: v.clone() for k, v in encoder.state_dict().items()}
        feats = lambda split, idx: encoder(images[split][idx])  # noqa: E731
        return train_student("vgg19_gru", cfg, feats, 16, caps, vocab, out, 0, scorer, encoder), initial

    straight, initial = run(tmp_path / "straight", Scorer())
    with pytest.raises(_Crash):
        run(tmp_path / "resumed", Scorer(crash_at=3))
    scorer = Scorer()
    scorer.calls = 2  # the validation rounds already done before the crash
    resumed, _ = run(tmp_path / "resumed", scorer)
    assert resumed["steps"] == straight["steps"] == 16
    for name in ("model.safetensors", "encoder.safetensors"):
        a, b = load_file(tmp_path / "straight" / "last" / name), load_file(tmp_path / "resumed" / "last" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    best = load_file(tmp_path / "straight" / "best" / "encoder.safetensors")
    last = load_file(tmp_path / "straight" / "last" / "encoder.safetensors")
    assert not torch.equal(best["weight"], initial["weight"])  # the encoder was trained
    assert not torch.equal(best["weight"], last["weight"])  # best/ has epoch 2's encoder, not the last one
    assert json.loads((tmp_path / "straight" / "best" / "student.json").read_text())["encoder_finetuned"] is True


def test_resumed_training_with_dropout_equals_an_uninterrupted_run(tmp_path):
    """Dropout draws from torch's generator: a run stopped after any epoch and resumed from last/ (which saves
    every generator's state) ends with the same weights, bit for bit, as one that was never stopped."""
    import random

    import numpy as np
    from safetensors.torch import load_file

    caps = {"train": [f"the lady wears a {c} hat ." for c in ("red", "blue", "green", "big")] * 8,
            "val": ["the lady wears a red hat ."] * 4}
    vocab = Vocabulary.build(caps["train"], 1)
    table = {"train": torch.randn(32, 16), "val": torch.randn(4, 16)}
    cfg = SMALL.model_copy(update={"epochs": 4, "batch_size": 8, "val_every_epochs": 1, "early_stop_patience": 9,
                                   "dropout": 0.5})

    class Scorer:
        def __init__(self, crash_at=None, calls=0):
            self.calls, self.crash_at = calls, crash_at

        def score(self, refs, hyps, only=None):
            self.calls += 1
            if self.calls == self.crash_at:
                raise _Crash
            return {"CIDEr-D": [0.1, 0.5, 0.3, 0.6][self.calls - 1]}

    def run(out, scorer):
        return train_student("vgg19_gru", cfg, lambda s, idx: table[s][idx], 16, caps, vocab, out, 0, scorer)

    def weights(folder):
        return load_file(folder / "model.safetensors")

    straight = run(tmp_path / "straight", Scorer())
    for crash in (2, 3, 4):  # in the validation of epochs 2, 3, 4: resumed after epochs 1, 2, 3
        out = tmp_path / f"crash-{crash}"
        with pytest.raises(_Crash):
            run(out, Scorer(crash_at=crash))
        torch.manual_seed(123), np.random.seed(123), random.seed(123)  # the process that resumes is another one
        resumed = run(out, Scorer(calls=crash - 1))
        assert resumed["resumed_after_epoch"] == crash - 1 and resumed["curves"] == straight["curves"]
        for folder in ("last", "best"):
            a, b = weights(tmp_path / "straight" / folder), weights(out / folder)
            assert all(torch.equal(a[k], b[k]) for k in a), (crash, folder)


@pytest.mark.slow
def test_students_stage_fine_tunes_the_encoder(make_config):
    from pipeline.students.encoders import build_encoder

    path = make_config(students={"archs": ["resnet101_gru"], "epochs": 2, "batch_size": 16, "beam_size": 2,
                                 "num_workers": 2,
                                 "encoder": {"pretrained": False, "width": 0.125, "image_size": 32,
                                             "finetune": True}, "encoder_lr": 1e-3})
    cfg = load_config(path)
    prepare.run(cfg, Namespace(force=False))
    students.run(cfg, Namespace(force=False))
    out = cfg.run_dir / "students" / "resnet101_gru__gt"
    metrics = json.loads((out / "metrics.json").read_text())
    assert not (cfg.run_dir / "students" / "features").exists()  # nothing cached: the encoder changes
    from safetensors.torch import load_file

    trained = load_file(out / "best" / "encoder.safetensors")
    initial = build_encoder("resnet101", cfg.students.encoder, cfg.seed).state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial if initial[k].is_floating_point())
    assert json.loads((out / "best" / "student.json").read_text())["encoder_finetuned"] is True
    # the test predictions come from the best decoder with the encoder saved beside it
    from pipeline.data.formats import load_captions, split_rows
    from pipeline.students.features import EncoderFeatures
    from pipeline.students.train import decode_split

    test_rows = split_rows(load_captions(cfg.run_dir / "data" / "captions"), "test")
    student = load_student(out / "best")
    feats = EncoderFeatures("resnet101_gru", student.encoder, 32, {"test": [r["image_path"] for r in test_rows]})
    hyps = decode_split(student.decoder, feats, "test", len(test_rows), student.vocab, 2, cfg.students.max_length)
    saved = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert saved == [{"image_id": r["image_id"], "caption": h} for r, h in zip(test_rows, hyps)]
    # metrics.json scores exactly those predictions against the ground-truth test captions
    with CaptionScorer(meteor=False) as scorer:
        again = scorer.score({r["image_id"]: [r["caption"]] for r in test_rows},
                             {p["image_id"]: p["caption"] for p in saved})
    assert metrics["test_images"] == len(test_rows) > 0
    assert {k: metrics["test"][k] for k in again} == pytest.approx(again)


@pytest.mark.slow
def test_students_stage_trains_scores_and_beats_baseline(make_config):
    path = make_config(data={"synthetic": {"num_images": 400, "image_size": 64}},
                       students={"archs": ["vgg19_gru", "vit_transformer"], "epochs": 15, "batch_size": 16,
                                 "encoder": {"pretrained": False, "width": 0.25, "image_size": 64},
                                 "val_every_epochs": 5, "beam_size": 2})
    cfg = load_config(path)
    prepare.run(cfg, Namespace(force=False))
    students.run(cfg, Namespace(force=False))
    out = cfg.run_dir / "students"
    baseline = json.loads((out / "baseline__gt" / "metrics.json").read_text())["test"]["CIDEr-D"]
    for arch in ("vgg19_gru", "vit_transformer"):
        metrics = json.loads((out / f"{arch}__gt" / "metrics.json").read_text())
        assert set(metrics["test"]) >= {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"}
        assert metrics["test"]["CIDEr-D"] > baseline, (arch, metrics["test"], baseline)
        preds = (out / f"{arch}__gt" / "predictions.jsonl").read_text().splitlines()
        assert len(preds) == metrics["test_images"]
        assert read_manifest(out / f"{arch}__gt")["figures"]["CIDEr-D"] == pytest.approx(
            metrics["test"]["CIDEr-D"], abs=1e-4)
        assert 0.5 < metrics["attributes"]["macro"] <= 1 and set(metrics["image_reliance"]) >= {
            "attribute_macro_drop", "cider_drop", "permuted"}
        assert metrics["image_reliance"]["attribute_macro_drop"] == pytest.approx(
            metrics["attributes"]["macro"] - metrics["image_reliance"]["permuted"]["attribute_macro"])
        best = out / f"{arch}__gt" / "best"  # self-describing, with its model card
        shipped = json.loads((best / "student.json").read_text())
        assert shipped["test_metrics"]["test"] == metrics["test"] and shipped["caption_source"]["name"] == "gt"
        card = front_matter((best / "README.md").read_text())
        assert card["pipeline_tag"] == "image-to-text" and card["architecture"] == arch
        assert card["test_metrics"]["attribute_accuracy"] == pytest.approx(metrics["attributes"]["macro"], abs=1e-4)
        assert (best / "encoder.safetensors").is_file()
    summary = (out / "summary.md").read_text()
    assert "constant caption (baseline)" in summary and "majority attributes (baseline)" in summary
    vit = json.loads((out / "vit_transformer__gt" / "best" / "student.json").read_text())["encoder"]["settings"]
    assert display_name("vit_transformer", vit) in summary
    assert len(list((out / "features").glob("*.safetensors"))) == 2
    before = [(out / f / "metrics.json").stat().st_mtime_ns for f in ("vgg19_gru__gt", "baseline__gt")]
    students.run(cfg, Namespace(force=False))  # up to date: skipped, the baselines too
    assert [(out / f / "metrics.json").stat().st_mtime_ns for f in ("vgg19_gru__gt", "baseline__gt")] == before


@pytest.mark.slow
def test_pretrained_encoders_load_local_torchvision_weights_only(tmp_path, monkeypatch):
    """ImageNet-shaped checkpoints written here (random values, torchvision's file names) load into each encoder,
    which builds its torchvision model once; a missing file fails naming the path instead of downloading."""
    from torchvision import models

    from pipeline.core.errors import PipelineError
    from pipeline.students.encoders import WEIGHTS, build_encoder, weights_file

    settings = EncoderSettings(pretrained=True, weights_dir=tmp_path, image_size=224)
    builders = {"vgg19": models.vgg19, "resnet101": models.resnet101, "vit_b_16": models.vit_b_16}
    with pytest.raises(PipelineError, match=str(weights_file("resnet101", settings))):
        build_encoder("resnet101", settings)
    image = torch.randn(1, 3, 224, 224)
    dims = {"vgg19": (1, 4096), "resnet101": (1, 49, 2048), "vit_b_16": (1, 197, 768)}
    for name, builder in builders.items():
        torch.manual_seed(7)
        full = builder().eval()
        torch.save(full.state_dict(), tmp_path / Path(WEIGHTS[name].url).name)
        built = []
        monkeypatch.setattr(models, name, lambda *a, b=builder, built=built, **k: built.append(1) or b(*a, **k))
        encoder = build_encoder(name, settings, seed=0).eval()
        assert len(built) == 1, name
        with torch.no_grad():
            feats = encoder(image)
            if name == "vgg19":  # fc7 after ReLU: the classifier without its last layer
                expected = full.classifier[:-1](torch.flatten(full.avgpool(full.features(image)), 1))
            elif name == "resnet101":
                body = torch.nn.Sequential(*list(full.children())[:-2])
                expected = body(image).flatten(2).transpose(1, 2)
            else:
                x = full._process_input(image)
                expected = full.encoder(torch.cat([full.class_token.expand(1, -1, -1), x], dim=1))
        assert feats.shape == dims[name], name
        # the encoder runs in channels-last layout: other convolution kernels, the same values to float precision
        # (of the random ResNet's activations, up to ~1e5)
        assert torch.allclose(feats, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item()), name
        (tmp_path / Path(WEIGHTS[name].url).name).unlink()
    with pytest.raises(PipelineError, match="needs 224"):
        build_encoder("vit_b_16", settings.model_copy(update={"image_size": 96}))


@pytest.mark.slow
def test_killed_students_stage_resumes_from_its_last_epoch(make_config):
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipeline.data.formats import load_splits
    from tests.helpers import ROOT

    path = make_config(students={"archs": ["vgg19_gru"], "epochs": 40, "batch_size": 8, "val_every_epochs": 10,
                                 "early_stop_patience": 99, "beam_size": 1,
                                 "encoder": {"pretrained": False, "width": 0.125, "image_size": 32}})
    cfg = load_config(path)
    prepare.run(cfg, Namespace(force=False))
    out = cfg.run_dir / "students" / "vgg19_gru__gt"
    proc = subprocess.Popen([sys.executable, "-m", "stages.students", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def epochs_done() -> int:
        try:
            return json.loads((out / "last" / "state.json").read_text())["epoch"]
        except (FileNotFoundError, json.JSONDecodeError):
            return 0

    deadline = time.time() + 300
    while time.time() < deadline and epochs_done() < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = epochs_done()
    assert 2 <= killed_at < 40 and read_manifest(out) is None, killed_at
    students.run(cfg, Namespace(force=False))
    metrics = json.loads((out / "metrics.json").read_text())
    n_train = len(load_splits(cfg.run_dir / "data" / "captions")["train"])
    assert metrics["resumed_after_epoch"] >= killed_at
    assert metrics["epochs_run"] == 40 and metrics["steps"] == 40 * -(-n_train // 8)
    curves = json.loads((out / "curves.json").read_text())
    assert [step for step, _ in curves["val_cider"]] == [k * -(-n_train // 8) for k in (10, 20, 30, 40)]


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["vgg19_gru", "vit_transformer"])
def test_students_train_and_decode_on_cuda_under_autocast(tmp_path, arch):
    from pipeline.students.train import decode_split

    torch.manual_seed(0)
    caps = {"train": [f"the lady wears a {c} hat ." for c in ("red", "blue", "green", "big")] * 8,
            "val": ["the lady wears a red hat ."] * 4}
    vocab = Vocabulary.build(caps["train"], 1)
    shape = ARCH_FEATS[arch]
    table = {"train": torch.randn(32, *shape), "val": torch.randn(4, *shape)}
    feats = lambda split, idx: table[split][idx]  # noqa: E731
    cfg = SMALL.model_copy(update={"epochs": 8, "batch_size": 8, "val_every_epochs": 4, "early_stop_patience": 9,
                                   "decoder_lr": 3e-3})

    class ExactMatch:
        def score(self, refs, hyps, only=None):
            return {"CIDEr-D": sum(hyps[k] == refs[k][0] for k in refs) / len(refs)}

    result = train_student(arch, cfg, feats, shape[-1], caps, vocab, tmp_path, 0, ExactMatch())
    losses = [loss for _, loss in result["curves"]["train_loss"]]
    assert losses[-1] < 0.5 * losses[0], losses
    model, vocab, _ = load_student(tmp_path / "best", cfg)
    assert next(model.parameters()).device.type == "cuda"
    hyps = decode_split(model, feats, "val", 4, vocab, 2, cfg.max_length)
    assert all(h.startswith("the lady wears a ") for h in hyps), hyps


def _fake_distilled(cfg, name: str, photos: list[str], k: int) -> None:
    """A distilled dataset laid out as `distill` writes it, without a teacher: k captions of each train and val image
    (the ground truth's, sample j marked by a word) and of each unlabelled photo ("zebra" ones), meta and manifest."""
    import time

    from pipeline.core.rundir import atomic_write_json, write_manifest
    from pipeline.data.formats import DISTILL_COLUMNS, load_captions, split_rows, to_hf_dataset

    gt = load_captions(cfg.run_dir / "data" / "captions")
    rows = [{**r, "caption": f"{r['caption']} sample{j}", "source": name, "sample": j, "origin": "dataset"}
            for s in ("train", "val") for r in split_rows(gt, s) for j in range(k)]
    rows += [{"image_id": f"unlabeled/{Path(p).name}", "image_path": p, "caption": f"a zebra dress number {j}.",
              "split": "train", "source": name, "sample": j, "origin": "unlabeled"} for p in photos for j in range(k)]
    rows += [{**r, "sample": 0, "origin": "dataset"} for r in split_rows(gt, "test")]
    out = cfg.run_dir / "distill" / name
    to_hf_dataset(rows, DISTILL_COLUMNS).save_to_disk(str(out / "captions"))
    atomic_write_json(out / "meta.json", {"temperature": 0.9, "top_p": 1.0, "prompt": "p", "seed": 0,
                                          "samples_per_image": k, "unlabeled": "photos", "teacher_model": "t"})
    write_manifest(out, stage="distill", config={"name": name}, inputs={}, started=time.time())


def test_students_train_on_every_sample_and_on_gt_plus_unlabeled_captions(make_config, tmp_path, monkeypatch):
    """k captions of an image are k training rows; gt+<dataset> adds the dataset's unlabelled-image captions to the
    ground truth; validation and test are the ground truth's for every source; unlabelled images get their own
    feature cache."""
    import numpy as np
    from PIL import Image

    from pipeline.core.errors import PipelineError
    from pipeline.core.rundir import RunDir
    from pipeline.data.formats import load_captions, split_rows
    from pipeline.workflows.students import source_rows

    path = make_config(students={"archs": ["resnet101_gru"], "epochs": 2, "batch_size": 16, "beam_size": 1,
                                 "min_word_count": 1, "val_every_epochs": 1,
                                 "encoder": {"pretrained": False, "width": 0.125, "image_size": 32}})
    cfg = load_config(path, ["students.sources=[fake, gt+fake]"])
    prepare.run(cfg, Namespace(force=False))
    photos = []
    for i in range(3):
        photos.append(str(tmp_path / f"photo{i}.png"))
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photos[-1])
    _fake_distilled(cfg, "fake", photos, k=2)
    _fake_distilled(cfg, "plain", [], k=1)
    seen = {}
    real = students.run_experiment
    monkeypatch.setattr(students, "run_experiment", lambda *a, **kw: seen.setdefault(kw["source"], kw["rows"])
                        and real(*a, **kw))
    monkeypatch.setattr(students, "CaptionScorer", lambda meteor: CaptionScorer(meteor=False))
    students.run(cfg, Namespace(force=False))
    gt = load_captions(cfg.run_dir / "data" / "captions")
    gt_rows = {s: split_rows(gt, s) for s in ("train", "val", "test")}
    fake = split_rows(load_captions(cfg.run_dir / "distill" / "fake" / "captions"), "train")
    unlabeled = [r for r in fake if r["origin"] == "unlabeled"]
    assert len(fake) == 2 * (len(gt_rows["train"]) + 3) and len(unlabeled) == 6
    assert seen["fake"]["train"] == fake and seen["gt+fake"]["train"] == gt_rows["train"] + unlabeled
    for source in ("fake", "gt+fake"):
        assert seen[source]["val"] == gt_rows["val"] and seen[source]["test"] == gt_rows["test"]
        out = cfg.run_dir / "students" / f"resnet101_gru__{source}"
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["steps"] == 2 * -(-len(seen[source]["train"]) // 16)  # an epoch = every (image, caption) row
        assert metrics["test_images"] == len(gt_rows["test"])
        assert "zebra" in json.loads((out / "best" / "vocab.json").read_text())["itos"]
    assert len(list((cfg.run_dir / "students" / "features").glob("*.safetensors"))) == 2  # dataset + photos
    card = front_matter((cfg.run_dir / "students" / "resnet101_gru__gt+fake" / "best" / "README.md").read_text())
    assert card["caption_source"] == "gt+fake"
    shipped = json.loads((cfg.run_dir / "students" / "resnet101_gru__gt+fake" / "best" / "student.json").read_text())
    assert shipped["caption_source"]["kind"] == "ground truth + distilled unlabelled"
    with pytest.raises(PipelineError, match="source 'gt\\+plain' adds the dataset's captions of unlabelled images"):
        source_rows(RunDir(cfg.run_dir), "gt+plain", gt_rows)


def test_students_retrain_when_their_encoder_weights_change(make_config):
    """A student depends on the content of the weights file its encoder loads: the same file keeps it up to date,
    other weights (a new ImageNet download, a rebuilt demo stand-in) train it again."""
    from pipeline.students.encoders import torchvision_model, weights_file

    path = make_config(data={"synthetic": {"num_images": 60, "image_size": 64}},
                       students={"archs": ["vgg19_gru"], "epochs": 1, "batch_size": 16, "beam_size": 1,
                                 "encoder": {"pretrained": True, "width": 0.125, "image_size": 64}})
    cfg = load_config(path)
    cfg.students.encoder.weights_dir = cfg.run_dir / "weights"
    file = weights_file("vgg19", cfg.students.encoder)
    file.parent.mkdir(parents=True)

    def write_weights(seed: int) -> None:
        torch.manual_seed(seed)
        torch.save(torchvision_model("vgg19", cfg.students.encoder).state_dict(), file)

    write_weights(0)
    prepare.run(cfg, Namespace(force=False))
    students.run(cfg, Namespace(force=False))
    manifest = cfg.run_dir / "students" / "vgg19_gru__gt" / "manifest.json"
    first, written = read_manifest(manifest.parent), manifest.stat().st_mtime_ns
    assert first["inputs"]["encoder_weights"] == sha256_file(file)
    write_weights(0)  # the same weights written again: a new file time, the same content
    students.run(cfg, Namespace(force=False))
    assert manifest.stat().st_mtime_ns == written
    write_weights(1)
    students.run(cfg, Namespace(force=False))
    assert manifest.stat().st_mtime_ns != written
    assert read_manifest(manifest.parent)["inputs"]["encoder_weights"] == sha256_file(file) != first["inputs"][
        "encoder_weights"]


def test_results_skip_a_baseline_another_step_is_still_computing(tmp_path):
    """Students steps of several sources run side by side: one step's summary must not read another source's
    baseline folder before its metrics.json exists (the demo's `make demo` failed on exactly that)."""
    from pipeline.core.rundir import RunDir
    from pipeline.evaluation.results import finished_results, write_source_baselines

    rd = RunDir(tmp_path)
    (rd.students / "baseline__creative").mkdir(parents=True)  # being written elsewhere
    assert finished_results(rd) == ([], {})
    rows = [{"image_id": str(i), "caption": f"The lady wears a {w} skirt."} for i, w in enumerate(["long", "short"])]
    with CaptionScorer(meteor=False) as scorer:
        write_source_baselines(rd.students / "baseline__gt", {"captions": "a"}, scorer, [r["caption"] for r in rows],
                               rows)
    assert set(finished_results(rd)[1]) == {"gt"} and not (rd.students / "baseline__gt" / ".metrics.json.lock").exists()
