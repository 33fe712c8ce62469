import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.core.config import load_config
from pipeline.core.rundir import read_manifest
from pipeline.data.formats import load_captions, split_rows
from pipeline.data.images import load_rgb
from pipeline.teacher.collator import IGNORE_INDEX, CaptionCollator, TooLongError, build_prompt
from pipeline.teacher.generate import PerRowSampler, generate_captions
from pipeline.teacher.loading import TeacherError, load_base_model, load_processor, load_teacher
from stages import finetune
from tests.helpers import ROOT


def _rows(cfg, split="train"):
    return split_rows(load_captions(cfg.run_dir / "data" / "captions"), split)


def _batch(rows):
    return [{"image": load_rgb(r["image_path"]), "caption": r["caption"],
             "image_id": r["image_id"]} for r in rows]


def test_collator_masks_everything_but_the_answer(teacher_world):
    cfg = load_config(teacher_world("collator"))
    processor = load_processor(cfg.teacher.model)
    rows = _rows(cfg)[:3]
    rows[1] = {**rows[1], "caption": "A short one."}
    batch = CaptionCollator(processor, max_length=512)(_batch(rows))
    tok = processor.tokenizer
    image_id = processor.image_token_id
    prompt_len = int(processor(images=[Image.new("RGB", (8, 8))], text=[build_prompt(processor)],
                                return_tensors="pt")["input_ids"].shape[1])
    for i, row in enumerate(rows):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        answer = tok(" " + row["caption"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = prompt_len + len(answer)
        assert (labels[:prompt_len] == IGNORE_INDEX).all()  # prompt and image tokens
        tiny = cfg.teacher.tiny
        assert (ids[:prompt_len] == image_id).sum() == tiny.image_size ** 2 // tiny.patch_size ** 2
        assert labels[prompt_len:n].tolist() == answer  # caption tokens + EOS
        assert (labels[n:] == IGNORE_INDEX).all() and (mask[n:] == 0).all() and (mask[:n] == 1).all()
        assert (labels[ids == image_id] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape[0] == 3
    # lengths differ, so padding is really exercised
    assert len({int(m.sum()) for m in batch["attention_mask"]}) == 3


def test_collator_refuses_to_cut_a_long_sample(teacher_world):
    cfg = load_config(teacher_world("toolong"))
    processor = load_processor(cfg.teacher.model)
    with pytest.raises(TooLongError, match="exceed teacher.train.max_length=30"):
        CaptionCollator(processor, max_length=30)(_batch(_rows(cfg)[:1]))


def test_bad_teacher_path_and_missing_adapter(tmp_path, teacher_world):
    with pytest.raises(TeacherError, match="does not exist"):
        load_base_model(tmp_path / "nope", "fp32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="no config.json"):
        load_base_model(tmp_path / "empty", "fp32")
    cfg = load_config(teacher_world("noadapter"))
    with pytest.raises(TeacherError, match="LoRA adapter .* not found"):
        load_teacher(cfg.teacher.model, tmp_path / "missing-adapter", precision="fp32")


@pytest.mark.slow
def test_demo_teacher_learns_and_merge_matches(teacher_world):
    path = teacher_world("learns", teacher={"train": {"epochs": 4, "merge": True}})
    cfg = load_config(path)
    finetune.run(cfg, Namespace(force=False))
    fig = read_manifest(cfg.run_dir / "teacher")["figures"]
    assert fig["final_eval_loss"] <= 0.5 * fig["first_eval_loss"], fig["eval_losses"]
    gen = fig["held_out_generation"]
    assert gen["finetuned"]["BLEU-4"] > gen["untrained"]["BLEU-4"] + 0.05
    assert gen["finetuned"]["CIDEr-D"] > gen["untrained"]["CIDEr-D"] + 0.1

    # adapter-on-base and the merged, reloaded model give the same logits
    adapter, merged = cfg.run_dir / "teacher" / "adapter", cfg.run_dir / "teacher" / "merged"
    processor = load_processor(adapter)
    inputs = processor(images=[_batch(_rows(cfg, "val")[:1])[0]["image"]], text=[build_prompt(processor)],
                       return_tensors="pt")
    with torch.no_grad():
        a = load_teacher(cfg.teacher.model, adapter, precision="fp32")(**inputs).logits
        b = load_teacher(merged, None, precision="fp32")(**inputs).logits
        base = load_teacher(cfg.teacher.model, None, precision="fp32")(**inputs).logits
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    assert not torch.allclose(a, base, atol=1e-2)  # the adapter really changes the model


@pytest.mark.slow
def test_killed_finetune_resumes_from_last_checkpoint(teacher_world):
    path = teacher_world("resume", teacher={"train": {"epochs": 3, "save_steps": 5, "eval_steps": 20}})
    cfg = load_config(path)
    ckpts = cfg.run_dir / "teacher" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "stages.finetune", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts / "checkpoint-10" / "trainer_state.json").is_file():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(ckpts.glob("checkpoint-*")), "no checkpoint was written before the kill"
    (ckpts / "checkpoint-9999").mkdir()  # what a kill during a save leaves: no trainer_state.json yet
    (ckpts / "checkpoint-9999" / "adapter_model.safetensors").write_bytes(b"partial")
    assert read_manifest(cfg.run_dir / "teacher") is None
    finetune.run(cfg, Namespace(force=False))
    fig = read_manifest(cfg.run_dir / "teacher")["figures"]
    assert fig["resumed_from"] and fig["resumed_from"].startswith("checkpoint-")
    assert 10 <= int(fig["resumed_from"].split("-")[1]) < 9999
    assert fig["global_steps"] == 3 * -(-fig["train_samples"] // 8)
    adapter = cfg.run_dir / "teacher" / "adapter"
    _check_adapter(adapter)  # the resumed run saved trained LoRA and projector weights
    model = load_teacher(cfg.teacher.model, adapter, precision="fp32")
    saved = load_file(adapter / "adapter_model.safetensors")
    loaded = {name: p for name, p in model.named_parameters() if "lora_B" in name}
    assert len(loaded) == sum("lora_B" in k for k in saved)
    assert all(float(p.abs().sum()) > 0 for p in loaded.values())  # they reach the model, not zeros


def _check_adapter(adapter_dir: Path) -> None:
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert lora_b and all(v.numel() > 0 for v in lora_b.values())
    assert sum(float(v.abs().sum()) for v in lora_b.values()) > 0  # lora_B starts at zero: non-zero = trained+saved
    assert any("multi_modal_projector" in k for k in weights)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert "multi_modal_projector" in config["modules_to_save"]


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_two_ranks(teacher_world, zero):
    path = teacher_world(f"ds-{zero}", teacher={"train": {"max_steps": 4, "eval_steps": 2, "save_steps": 2,
                                                          "deepspeed": str(ROOT / f"configs/deepspeed/{zero}.json"),
                                                          "eval_generation_samples": 2}})
    port = {"zero2": "29631", "zero3": "29632"}[zero]
    res = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", port,
                          "--module", "stages.finetune", "--config", str(path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    cfg = load_config(path)
    manifest = read_manifest(cfg.run_dir / "teacher")
    assert manifest["figures"]["global_steps"] == 4
    adapter = cfg.run_dir / "teacher" / "adapter"
    _check_adapter(adapter)
    load_teacher(cfg.teacher.model, adapter, precision="fp32")


def _bnb_cpu_ok() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"bitsandbytes unavailable: {exc}"
    return None


@pytest.mark.slow
def test_qlora_finetune_path(teacher_world):
    reason = _bnb_cpu_ok()
    if reason:
        pytest.skip(reason)
    path = teacher_world("qlora", teacher={"quantization": "4bit", "precision": "bf16",
                                           "train": {"max_steps": 3, "eval_steps": 3, "save_steps": 3,
                                                     "gradient_checkpointing": True,
                                                     "eval_generation_samples": 0}})
    cfg = load_config(path)
    model = load_base_model(cfg.teacher.model, "bf16", quantization="4bit")
    if not any("4bit" in type(m).__name__ for m in model.modules()):
        pytest.skip("bitsandbytes did not quantise on this device")
    finetune.run(cfg, Namespace(force=False))
    _check_adapter(cfg.run_dir / "teacher" / "adapter")


def _nucleus(probs: torch.Tensor, top_p: float) -> list[int]:
    """The most likely tokens, most likely first, until their mass reaches ``top_p`` (computed by hand)."""
    kept, mass = [], 0.0
    for token in sorted(range(len(probs)), key=lambda t: -float(probs[t])):
        kept.append(token)
        mass += float(probs[token])
        if mass >= top_p:
            break
    return kept


def test_per_row_sampler_top_p_draws_from_the_nucleus_in_proportion():
    logits = torch.tensor([2.0, 1.6, 1.1, 0.4, 0.0, -1.0, -3.0])
    temperature, top_p, rows = 0.7, 0.8, 4000
    probs = torch.softmax(logits / temperature, -1)
    nucleus = _nucleus(probs, top_p)
    assert nucleus == [0, 1, 2]  # the top three hold 0.8 of the mass only together
    out = PerRowSampler(range(rows), temperature, top_p)(torch.zeros(rows, 1, dtype=torch.long),
                                                         logits.repeat(rows, 1))
    assert ((out == 0).sum(-1) == 1).all() and torch.isinf(out).sum() == rows * (len(logits) - 1)
    drawn = out.argmax(-1)
    assert set(drawn.tolist()) == set(nucleus)  # never outside the nucleus, every nucleus token drawn
    freq = torch.bincount(drawn, minlength=len(logits)).double() / rows
    expected = torch.zeros(len(logits), dtype=torch.double)
    expected[nucleus] = probs[nucleus].double() / probs[nucleus].sum()
    assert (freq - expected).abs().max() < 0.03  # ~4 standard errors at 4000 draws
    again = PerRowSampler(range(rows), temperature, top_p)(torch.zeros(rows, 1, dtype=torch.long),
                                                           logits.repeat(rows, 1))
    assert torch.equal(again.argmax(-1), drawn)  # the same seeds draw the same tokens


class _Projected(torch.nn.Module):
    """Parameter names as in a peft-wrapped LLaVA: a projector, a language-model layer, a frozen tower."""

    def __init__(self):
        super().__init__()
        self.multi_modal_projector = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        self.language_model = torch.nn.Linear(4, 4)
        self.vision_tower = torch.nn.Linear(4, 4).requires_grad_(False)

    def forward(self, x):
        return self.language_model(self.multi_modal_projector(x))


def test_projector_gets_its_own_learning_rate(tmp_path):
    from transformers import TrainingArguments

    from pipeline.teacher.train import TeacherTrainer

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.1, use_cpu=True,
                             report_to=[])
    model = _Projected()
    optimizer = TeacherTrainer(model=model, args=args, projector_lr=3e-3).create_optimizer()
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert len(group_of) == sum(p.requires_grad for p in model.parameters())  # frozen weights are not optimised
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = group_of[id(p)]
        assert group["lr"] == (3e-3 if name.startswith("multi_modal_projector.") else 1e-4), name
        decays = name.endswith("weight") and not name.startswith("multi_modal_projector.1")  # no decay: bias, norm
        assert group["weight_decay"] == (0.1 if decays else 0.0), name
    single = TeacherTrainer(model=_Projected(), args=args).create_optimizer()
    assert {g["lr"] for g in single.param_groups} == {1e-4}  # without projector_learning_rate: one rate


@pytest.mark.gpu
def test_sampler_on_cuda_draws_as_on_cpu():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(64, 1, dtype=torch.long)
    cpu = PerRowSampler(range(64), 0.9, 0.9)(ids, logits)
    cuda = PerRowSampler(range(64), 0.9, 0.9)(ids.cuda(), logits.cuda())
    assert cuda.device.type == "cuda" and torch.equal(cuda.cpu().argmax(-1), cpu.argmax(-1))


@pytest.mark.gpu
def test_teacher_generation_on_cuda_is_reproducible(teacher_world):
    cfg = load_config(teacher_world("cuda-generation"))
    processor = load_processor(cfg.teacher.model)
    model = load_teacher(cfg.teacher.model, None, precision="fp32").cuda()
    rows = _rows(cfg)[:6]
    images, ids = [load_rgb(r["image_path"]) for r in rows], [r["image_id"] for r in rows]
    first = generate_captions(model, processor, images, ids, seed=3, temperature=0.9, top_p=0.9, max_new_tokens=12)
    again = generate_captions(model, processor, images, ids, seed=3, temperature=0.9, top_p=0.9, max_new_tokens=12)
    assert first == again and len(first) == 6 and all(g.num_tokens > 0 for g in first)
    greedy = generate_captions(model, processor, images, ids, seed=3, temperature=0.0, top_p=1.0,
                               max_new_tokens=12)
    model_cpu = load_teacher(cfg.teacher.model, None, precision="fp32")
    assert greedy == generate_captions(model_cpu, processor, images, ids, seed=3, temperature=0.0, top_p=1.0,
                                       max_new_tokens=12)
