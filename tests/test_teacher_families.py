"""Any image-text-to-text teacher: tiny LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3, LLaVA-OneVision and
Gemma 3 checkpoints (and one of a shape the pipeline was not written against) through the teacher's code and, end to
end, finetune -> distill -> a student; SmolVLM and PaliGemma through the teacher's code."""

from argparse import Namespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.core.config import load_config
from pipeline.core.rundir import read_manifest
from pipeline.data.formats import load_captions, split_rows
from pipeline.teacher.collator import IGNORE_INDEX, CaptionCollator, PromptLengths, answer_ids, eos_token_ids
from pipeline.teacher.generate import generate_captions
from pipeline.teacher.loading import config_parts, load_base_model, load_processor, load_teacher, model_parts
from pipeline.teacher.train import build_peft_model, split_too_long
from pipeline.workflows.distill import distill_dataset
from stages import finetune, students
from tests import tiny_vlms

ALL = (*tiny_vlms.FAMILIES, "foreign")
# checked through the teacher's code, not end to end: SmolVLM (Idefics3's model with another processor) and PaliGemma,
# whose checkpoints have no chat template (ours is made up: the pipeline refuses them as they are); with one, its
# prefix-LM token types must come out right
CODE_ONLY = ("smolvlm", "paligemma")
# the sizes of DeepFashion photos (portrait) and of two odd ones: LLaVA-NeXT, Qwen2-VL and Idefics3 give each its own
# number of image tokens
SIZES = [(40, 64), (120, 30), (48, 48)]


@pytest.fixture(scope="session")
def checkpoints(teacher_world, tmp_path_factory):
    """family -> a tiny checkpoint folder (tokenizer trained on the DeepFashion-lite captions)."""
    cfg = load_config(teacher_world("families"))
    texts = [r["caption"] for r in split_rows(load_captions(cfg.run_dir / "data" / "captions"), "train")]
    root = tmp_path_factory.mktemp("families")
    return {f: tiny_vlms.build(f, root / f, texts) for f in (*ALL, *CODE_ONLY)}


def _teacher(cfg_like, path):
    return cfg_like.model_copy(update={"model": path, "tiny": None})


@pytest.mark.parametrize("family", (*ALL, *CODE_ONLY))
def test_collator_generation_and_lora_for_each_family(checkpoints, teacher_world, family):
    path = checkpoints[family]
    processor, model = load_processor(path), load_base_model(path, "fp32")
    eos = eos_token_ids(processor, model.generation_config)
    captions = ["The lady wears a short-sleeve shirt.", "His tank top has no sleeves, cotton fabric.", "A hat."]
    images = [Image.new("RGB", s, (40 * i, 90, 200 - 50 * i)) for i, s in enumerate(SIZES)]
    batch = CaptionCollator(processor, 1024, eos_ids=eos)(
        [{"image": im, "caption": c, "image_id": str(i)} for i, (im, c) in enumerate(zip(images, captions))])
    lengths = PromptLengths(processor)
    image_token = model.config.image_token_id
    for i, (im, caption) in enumerate(zip(images, captions)):
        n_prompt, answer = lengths(im.size), answer_ids(processor, caption, eos)
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        assert int(mask.sum()) == n_prompt + len(answer)
        assert (labels[:n_prompt] == IGNORE_INDEX).all() and labels[n_prompt: n_prompt + len(answer)].tolist() == answer
        assert answer[-1] in eos and sum(t in eos for t in answer) == 1  # exactly one end token, the last
        assert int((ids == image_token).sum()) == lengths.image_tokens[im.size]  # every image token is there
        assert processor.tokenizer.decode(answer, skip_special_tokens=True).strip() == caption
    if family in ("llava_next", "qwen2_vl", "idefics3", "llava_onevision"):  # image tokens depend on the image's size
        assert len(set(lengths.image_tokens.values())) > 1, lengths.image_tokens
    with torch.no_grad():
        loss = model(**batch).loss
    assert 0 < float(loss) < 20
    # the answer is causal: changing its last token changes no logit before it (PaliGemma's prefix LM would let an
    # answer typed as prompt see its own future)
    last = lengths(images[0].size) + len(answer_ids(processor, captions[0], eos)) - 1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    changed["input_ids"][0, last] = answer_ids(processor, "hat", eos)[0]
    with torch.no_grad():
        a, b = model(**inputs).logits[0, :last], model(**changed).logits[0, :last]
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())

    # LoRA on the language model's linear layers only; the projector trained in full
    cfg = load_config(teacher_world(f"lora-{family}"))
    peft_model = build_peft_model(_teacher(cfg.teacher, path), load_base_model(path, "fp32"))
    parts = model_parts(peft_model)
    lora = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert lora and all(n.startswith(parts.language_model + ".") for n in lora)  # none in the vision tower
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert any(parts.projector[0].rsplit(".", 1)[-1] in n for n in trained)
    peft_model.train()
    peft_model(**batch).loss.backward()  # the answer's loss reaches LoRA and the projector
    reached = [n for n, p in peft_model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0]
    assert any("lora_B" in n for n in reached) and any(parts.projector[0].rsplit(".", 1)[-1] in n for n in reached)
    meta, plain = config_parts(path), model_parts(model)  # config_parts: what 4-bit loading reads from config.json
    assert (meta.vision, meta.language_model, meta.projector) == (plain.vision, plain.language_model, plain.projector)

    # batched left-padded greedy captions equal one-by-one ones; generation stops at the family's end tokens
    ids = [str(i) for i in range(3)]
    kw = dict(seed=0, temperature=0.0, top_p=1.0, max_new_tokens=6)
    together = generate_captions(model, processor, images, ids, **kw)
    assert together == [generate_captions(model, processor, [im], [i], **kw)[0] for im, i in zip(images, ids)]


def test_too_long_samples_are_left_out_counting_each_images_tokens(checkpoints, tmp_path):
    path = checkpoints["llava_next"]
    processor = load_processor(path)
    eos = eos_token_ids(processor)
    rows = []
    for i, size in enumerate([(40, 64), (120, 30)]):
        Image.new("RGB", size).save(tmp_path / f"{i}.png")
        rows.append({"image_id": str(i), "image_path": str(tmp_path / f"{i}.png"), "caption": "A hat."})
    lengths = PromptLengths(processor)
    n = [lengths(s) + len(answer_ids(processor, "A hat.", eos)) for s in [(40, 64), (120, 30)]]
    assert n[0] > n[1]  # the portrait image has more image tokens (72 vs 34)
    keep, too_long = split_too_long(rows, processor, n[1], eos)  # only the second fits whole
    assert [r["image_id"] for r in keep] == ["1"]
    assert too_long == [{"image_id": "0", "tokens": n[0], "image_tokens": 72,
                         "caption_tokens": n[0] - lengths((40, 64))}]


E2E_TEACHER = {"lora": {"r": 16, "alpha": 32, "dropout": 0.0, "train_projector": True,
                        "modules_to_save": ["lm_head", "embed_tokens"]},
               "train": {"epochs": 5, "learning_rate": 5e-3, "per_device_batch_size": 8, "eval_steps": 100,
                         "save_steps": 100, "max_val_samples": 8, "eval_generation_samples": 2, "merge": True}}


@pytest.mark.slow
@pytest.mark.parametrize("family", ALL)
def test_finetune_distill_student_end_to_end(checkpoints, teacher_world, family):
    path = teacher_world(f"e2e-{family}", teacher={**E2E_TEACHER, "model": str(checkpoints[family]), "tiny": None},
                         distill={"max_new_tokens": 160, "batch_size": 16, "temperature": 0.0, "name": "precise"},
                         students={"archs": ["vgg19_gru"], "sources": ["precise"], "epochs": 1, "batch_size": 16,
                                   "beam_size": 2, "val_every_epochs": 1,
                                   "encoder": {"pretrained": False, "width": 0.125, "image_size": 48}})
    cfg = load_config(path)
    finetune.run(cfg, Namespace(force=False))
    teacher = read_manifest(cfg.run_dir / "teacher")["figures"]
    assert teacher["final_eval_loss"] < teacher["first_eval_loss"]
    adapter = cfg.run_dir / "teacher" / "adapter"
    saved = load_file(adapter / "adapter_model.safetensors")
    parts = model_parts(load_base_model(checkpoints[family], "fp32"))
    projector = parts.projector[0].rsplit(".", 1)[-1]
    assert any(projector in k for k in saved)  # the trained projector is in the adapter
    assert sum(float(v.abs().sum()) for k, v in saved.items() if "lora_B" in k) > 0
    # the merged folder loads as the same family and gives the adapter's logits
    processor = load_processor(adapter)
    image = Image.new("RGB", (40, 64), (200, 30, 30))
    batch = CaptionCollator(processor, 1024)([{"image": image, "caption": "A hat.", "image_id": "x"}])
    batch.pop("labels")
    with torch.no_grad():
        a = load_teacher(checkpoints[family], adapter, precision="fp32")(**batch).logits
        b = load_teacher(cfg.run_dir / "teacher" / "merged", None, precision="fp32")(**batch).logits
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())

    out = distill_dataset(cfg)
    kept = read_manifest(out)["figures"]["kept"]
    assert kept > 0
    students.run(cfg, Namespace(force=False))
    student = cfg.run_dir / "students" / "vgg19_gru__precise"
    assert (student / "metrics.json").is_file() and (student / "best").is_dir()
