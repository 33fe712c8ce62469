import json
from argparse import Namespace

import pytest
import torch

from pipeline.config import EncoderSettings, StudentsConfig, load_config
from pipeline.metrics import CaptionScorer
from pipeline.rundir import read_manifest
from pipeline.students import features as features_mod
from pipeline.students.beam import beam_search, greedy_decode
from pipeline.students.decoders import build_decoder
from pipeline.students.train import caption_loss, train_student
from pipeline.students.vocab import Vocabulary
from stages import prepare, students

ARCH_FEATS = {"vgg19_gru": (32,), "resnet101_gru": (48,), "resnet101_attn_gru": (9, 48), "vit_transformer": (5, 24)}
SMALL = StudentsConfig(embed_dim=16, hidden_dim=32, transformer_heads=4, transformer_layers=2, max_length=12,
                       dropout=0.0)


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


def test_transformer_incremental_step_matches_full_forward():
    torch.manual_seed(2)
    model = build_decoder("vit_transformer", 24, 30, SMALL).eval()
    feats, tokens = torch.randn(3, 5, 24), torch.randint(3, 30, (3, 9))
    with torch.no_grad():
        full = torch.log_softmax(model(feats, tokens)[0], -1)
        state, steps = model.init_state(feats), []
        for t in range(tokens.shape[1]):
            logp, state = model.step(state, tokens[:, t])
            steps.append(logp)
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)


def test_metrics_match_pycocoevalcap_scorers_called_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = {"a": ["The lady wears a long-sleeve shirt with floral patterns."],
            "b": ["His pants are of long length, with denim fabric."],
            "c": ["There is a ring on her finger. She wears a hat."]}
    hyps = {"a": "The lady wears a shirt with floral patterns.", "b": "His pants are long denim pants.",
            "c": "There is a hat on her head."}
    with CaptionScorer() as scorer:
        ours = scorer.score(refs, hyps)
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in hyps.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    direct = {"BLEU-1": bleu[0], "BLEU-4": bleu[3], "METEOR": Meteor().compute_score(gts, res)[0],
              "ROUGE-L": Rouge().compute_score(gts, res)[0], "CIDEr-D": Cider().compute_score(gts, res)[0]}
    for name, value in direct.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    assert 0 < ours["BLEU-4"] < 1 and ours["CIDEr-D"] > 0


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
    summary = (out / "summary.md").read_text()
    assert "constant baseline" in summary and "vit_transformer" in summary
    assert len(list((out / "features").glob("*.safetensors"))) == 2
    before = (out / "vgg19_gru__gt" / "manifest.json").stat().st_mtime_ns
    students.run(cfg, Namespace(force=False))  # up to date: skipped
    assert (out / "vgg19_gru__gt" / "manifest.json").stat().st_mtime_ns == before
