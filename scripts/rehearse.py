"""The 13B fine-tune rehearsed on the CPU at its true shape: a LLaVA with llava-1.5-13b-hf's exact shapes (CLIP
ViT-L/14 at 336 px -> 576 image tokens, vision_feature_layer -2, the 5120-wide 40-head Llama, vocabulary 32064,
LLaVA-1.5's chat template) at 2 vision + 2 text layers with random weights, fine-tuned by the project's own code
(CaptionCollator, build_peft_model, training_arguments, TeacherTrainer, configs/deepfashion-13b.yaml's teacher
settings) under DeepSpeed ZeRO-2/3 on 2 CPU ranks, with the peak memory per rank and the step time measured.

    python scripts/rehearse.py build --out runs/rehearsal/model          # ~1 min, 2 GB
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python -m deepspeed.launcher.runner --num_gpus 2 --master_port 29511 \
        scripts/rehearse.py train --model runs/rehearsal/model --zero 3 --out runs/rehearsal/z3    # ~2 min a step
    python scripts/rehearse.py check --model runs/rehearsal/model --run runs/rehearsal/z3
    python -m stages.plan --config configs/deepfashion-13b.yaml teacher.model=runs/rehearsal/model ...  (docs/plan.md)

The full run's bf16 is ~130x slower than fp32 on a CPU without bf16 matmul units, so the rehearsal trains in fp32
(``--precision``); everything else is the full config's. Results: docs/results.md ("The 13B shape rehearsed").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.data.formats import INSTRUCTION
from pipeline.demo.tiny_llava import CHAT_TEMPLATE  # llava-1.5-hf's template

WORDS = ("the lady wears a long-sleeve shirt with pure color patterns its fabric is cotton and it has a round neckline "
         "the trousers are of long length denim solid color there is an accessory on her wrist she wears a hat the "
         "person is wearing a short-sleeve T-shirt with graphic patterns knitting chiffon leather stripe floral "
         "plaid lattice V-shape lapel crew neckline belt glasses ring neckwear socks shoes skirt dress").split()


def mem() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) / 1024 ** 2  # GiB
    return out


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    """VmRSS every 20 ms (a check on VmHWM, and a peak per phase)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0.0
        self.stop = False

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, mem()["VmRSS"])
            time.sleep(0.02)


# ------------------------------------------------------------------------------------------------------------ build
def build_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    vocab = tok.get_vocab()
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    n = len(vocab)
    vocab.update({f"<unused_{k}>": k for k in range(n, 32000)})  # unreachable fillers: ids up to 31999 as in Llama
    big = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    big.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    big.decoder = decoders.ByteLevel()
    big.add_special_tokens(["<unk>", "<s>", "</s>"])
    big.add_special_tokens(["<image>", "<pad>"])  # 32000, 32001 as in llava-1.5-13b-hf
    big.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=big, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="right", model_max_length=4096)
    assert fast.convert_tokens_to_ids("<image>") == 32000 and fast.pad_token_id == 32001, (
        fast.convert_tokens_to_ids("<image>"), fast.pad_token_id)
    assert (fast.unk_token_id, fast.bos_token_id, fast.eos_token_id) == (0, 1, 2)
    return fast


def cmd_build(a):
    import random

    import numpy as np
    import torch
    from PIL import Image
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    rng = random.Random(0)
    captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(14, 22))).capitalize() + "." for _ in range(64)]
    tok = build_tokenizer(captions + [INSTRUCTION, "USER: ASSISTANT:"])
    W = dict(h=256, i=688, a=4, vh=128, vi=512, va=2, px=56) if a.small else dict(h=5120, i=13824, a=40, vh=1024,
                                                                                   vi=4096, va=16, px=336)
    text = LlamaConfig(vocab_size=32064, hidden_size=W["h"], intermediate_size=W["i"],
                       num_hidden_layers=a.text_layers, num_attention_heads=W["a"], num_key_value_heads=W["a"],
                       max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=W["vh"], intermediate_size=W["vi"], num_hidden_layers=a.vision_layers,
                              num_attention_heads=W["va"], image_size=W["px"], patch_size=14, projection_dim=768,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, pad_token_id=32001,
                      projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=(W["px"] // 14) ** 2, tie_word_embeddings=False)
    t0 = time.time()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # init straight in bf16: half the memory of fp32-then-cast
    model = LlavaForConditionalGeneration(cfg)
    torch.set_default_dtype(torch.float32)
    model.to(torch.bfloat16)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 32001, 2
    n = sum(p.numel() for p in model.parameters())
    image_processor = CLIPImageProcessor(size={"shortest_edge": W["px"]},
                                         crop_size={"height": W["px"], "width": W["px"]})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "images").mkdir(exist_ok=True)
    rows = []
    for k, cap in enumerate(captions[:8]):
        arr = np.random.default_rng(k).integers(0, 255, (400, 300, 3), dtype=np.uint8)
        Image.fromarray(arr).save(out / "images" / f"{k}.jpg")
        rows.append({"image_path": str(out / "images" / f"{k}.jpg"), "caption": cap, "image_id": str(k)})
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps({"params": n, "build_s": round(time.time() - t0, 1), "tokenizer_len": len(tok),
                      "config_vocab": cfg.text_config.vocab_size, "dir": str(out)}))


# ------------------------------------------------------------------------------------------------------------ train
def teacher_config(model: str, zero: int, precision: str, steps: int, lr: float):
    """configs/deepfashion-13b.yaml's teacher section on the rehearsal model, ZeRO stage ``zero``."""
    from pipeline.core.config import load_config

    root = Path(__file__).resolve().parents[1]
    return load_config(root / "configs" / "deepfashion-13b.yaml", [
        f"teacher.model={model}", f"teacher.precision={precision}", f"teacher.train.max_steps={steps}",
        "teacher.train.per_device_batch_size=1", f"teacher.train.learning_rate={lr}", "teacher.train.warmup_ratio=0",
        f"teacher.train.bf16={'true' if precision == 'bf16' else 'false'}", "teacher.train.tf32=false",
        f"teacher.train.deepspeed={root / 'configs' / 'deepspeed' / f'zero{zero}.json'}"]).teacher


class Collator:
    """The project's CaptionCollator over rows with an image path."""

    def __init__(self, processor):
        from pipeline.teacher.collator import CaptionCollator

        self.collate = CaptionCollator(processor, max_length=2048)

    def __call__(self, batch):
        from PIL import Image

        return self.collate([{"image": Image.open(b["image_path"]).convert("RGB"), "caption": b["caption"],
                              "image_id": b["image_id"]} for b in batch])


def cmd_train(a):
    import hashlib

    phases = {"imports_start": mem()}
    sampler = Sampler()
    sampler.start()
    import torch

    torch.set_num_threads(a.threads)
    import torch.distributed as dist
    from transformers import TrainerCallback, set_seed

    from pipeline.teacher.loading import load_base_model, load_processor
    from pipeline.teacher.train import (
        TeacherTrainer,
        build_peft_model,
        last_complete_checkpoint,
        training_arguments,
    )

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    phases["after_imports"] = mem()
    cfg = teacher_config(a.model, a.zero, a.precision, a.steps, a.lr)
    a.ds = str(cfg.train.deepspeed)
    log = {"rank": rank, "world": world, "ds": a.ds, "torch_threads": torch.get_num_threads()}
    processor = load_processor(a.model)
    rows = json.loads((Path(a.model) / "rows.json").read_text())
    set_seed(42)  # as finetune() does first: the LoRA initialisation is the seed's, so runs can be compared
    t0 = time.time()
    model = load_base_model(a.model, cfg.precision, cfg.attn_implementation)  # as finetune() does: before the args
    model.config.use_cache = False
    phases["after_load"] = mem() | {"s": round(time.time() - t0, 1)}
    model = build_peft_model(cfg, model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    log["trainable_params"] = sum(getattr(p, "ds_numel", p.numel()) for p in trainable.values())
    log["total_params"] = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    phases["after_peft"] = mem()
    last = last_complete_checkpoint(out / "checkpoints") if a.resume else None  # as finetune() resumes
    log["resumed_from"] = Path(last).name if last else None
    args = training_arguments(cfg, out / "checkpoints", 42, has_val=False, resuming=last is not None)
    args.report_to, args.logging_steps = [], 1
    if a.save_steps:
        args.save_steps = a.save_steps
    else:
        args.save_strategy = "no"

    steps = []

    class Probe(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kw):
            m = kw.get("model")
            log["trainable_dtype_in_ds"] = sorted({str(p.dtype) for p in m.parameters() if p.requires_grad})
            phases["train_begin"] = mem()
            log["hwm_reset"] = reset_hwm()
            sampler.peak = 0.0

        def on_step_begin(self, args_, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            steps.append({"step": state.global_step, "s": round(time.perf_counter() - self.t, 2), **mem(),
                          "sampled_peak": round(sampler.peak, 3)})

    ds = [{"image_path": r["image_path"], "caption": r["caption"], "image_id": r["image_id"]} for r in rows]
    collator = Collator(processor)
    sample = collator(ds[:1])
    log["seq_len"] = int(sample["input_ids"].shape[1])
    log["image_tokens"] = int((sample["input_ids"] == 32000).sum())
    trainer = TeacherTrainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[Probe()])
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=last)
    log["train_s"] = round(time.time() - t0, 1)
    log["train_loss"] = result.training_loss
    log["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    phases["train_end"] = mem() | {"sampled_peak": round(sampler.peak, 3)}

    # the trained model's logits on sample 0 (all ranks: a ZeRO-3 forward gathers collectively)
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(**{k: v for k, v in sample.items() if k != "labels"}).logits.float()
    adapter = out / "adapter"
    reset_hwm()
    sampler.peak = 0.0
    t0 = time.time()
    if a.zero == 3:  # as finetune() saves
        trainer.save_model(str(adapter))
    elif trainer.is_world_process_zero():
        trainer.model.save_pretrained(str(adapter))
    log["save_s"] = round(time.time() - t0, 1)
    phases["save"] = mem() | {"sampled_peak": round(sampler.peak, 3)}
    if trainer.is_world_process_zero():
        processor.save_pretrained(adapter)  # as finetune() does: the adapter folder is a teacher of its own
        torch.save(logits[0, -8:].clone(), out / "trained_logits.pt")

    # every rank: its own view of the trained weights, gathered under ZeRO-3, and the file rank 0 wrote
    if dist.is_initialized():
        dist.barrier()
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if a.zero == 3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    else:
        import contextlib

        ctx = contextlib.nullcontext()
    with ctx:
        h = hashlib.sha256()
        for n, p in named:
            h.update(n.encode())
            h.update(p.detach().to(torch.float32).cpu().numpy().tobytes())
        log["live_trainable_sha"] = h.hexdigest()[:16]
        log["live_trainable_abs_sum"] = float(sum(p.detach().float().abs().sum() for p in params))
        live_b = {n: float(p.detach().float().abs().sum()) for n, p in named if "lora_B" in n}
    from safetensors.torch import load_file

    saved = load_file(str(adapter / "adapter_model.safetensors"))
    log["adapter_file"] = {"tensors": len(saved), "empty": [k for k, v in saved.items() if v.numel() == 0],
                           "numel": sum(v.numel() for v in saved.values()),
                           "bytes": (adapter / "adapter_model.safetensors").stat().st_size,
                           "lora_B_abs_sum": float(sum(v.float().abs().sum() for k, v in saved.items()
                                                       if "lora_B" in k)),
                           "abs_sum": float(sum(v.float().abs().sum() for v in saved.values()))}
    log["live_lora_B_abs_sum"] = sum(live_b.values())
    if dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, (log["live_trainable_sha"], log["adapter_file"]["abs_sum"]))
        log["ranks_agree"] = len({g[0] for g in gathered}) == 1 and len({g[1] for g in gathered}) == 1
        log["rank_hashes"] = gathered
    sampler.stop = True
    log["steps"] = steps
    log["phases"] = phases
    log["final"] = mem()
    (out / f"rank{rank}.json").write_text(json.dumps(log, indent=1))
    print(f"RANK {rank}:", json.dumps({k: log[k] for k in ("seq_len", "train_s", "losses", "ranks_agree",
                                                            "adapter_file") if k in log}), flush=True)


# ------------------------------------------------------------------------------------------------------------ check
def cmd_check(a):
    """The saved adapter on a fresh base model: it loads and changes the logits (and matches the trained model's)."""
    import torch

    from pipeline.teacher.loading import load_base_model, load_processor, load_teacher

    torch.set_num_threads(a.threads)
    run = Path(a.run)
    rows = json.loads((Path(a.model) / "rows.json").read_text())
    batch = Collator(load_processor(a.model))(rows[:1])
    batch.pop("labels")
    with torch.no_grad():
        base = load_base_model(a.model, a.precision).eval()(**batch).logits.float()[0, -8:]
        tuned = load_teacher(a.model, run / "adapter", precision=a.precision)(**batch).logits.float()[0, -8:]
    trained = torch.load(run / "trained_logits.pt")
    res = {"run": str(run), "max|tuned-base|": float((tuned - base).abs().max()),
           "max|tuned-trained(in DS)|": float((tuned - trained).abs().max()),
           "argmax_changed_frac": float((tuned.argmax(-1) != base.argmax(-1)).float().mean())}
    print(json.dumps(res))
    (run / "check.json").write_text(json.dumps(res, indent=1))


# ------------------------------------------------------------------------------------------------------ kill -9
def launcher(model: str, out: Path, zero: int, steps: int, port: int, *extra: str) -> list[str]:
    """The command that runs ``train`` on 2 CPU ranks under DeepSpeed's launcher."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
            str(Path(__file__).resolve()), "train", "--model", model, "--zero", str(zero), "--steps", str(steps),
            "--out", str(out), *extra]


def tensors_differ(a: Path, b: Path) -> float:
    """The largest absolute difference between two safetensors files with the same names (inf if names differ)."""
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return float("inf")
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def cmd_resume(a):
    """``train`` checkpointing every step, killed with SIGKILL (launcher and both ranks) once checkpoint 1 is
    complete, then rerun with ``--resume``; the result is compared with an uninterrupted run (``--reference``)."""
    out = Path(a.out)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = launcher(a.model, out, a.zero, a.steps, a.port, "--save-steps", "1")
    done = out / "checkpoints" / "checkpoint-1" / "trainer_state.json"  # the Trainer writes it last
    t0 = time.time()
    with open(out.parent / f"{out.name}-killed.log", "w") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        while not done.is_file() and proc.poll() is None:
            time.sleep(1)
        time.sleep(a.kill_delay)  # into step 2
        alive = proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if not alive or not done.is_file():
        raise SystemExit(f"the run ended before it could be killed; see {out.parent / f'{out.name}-killed.log'}")
    killed_s = round(time.time() - t0, 1)
    with open(out.parent / f"{out.name}-resumed.log", "w") as logf:
        subprocess.run(cmd + ["--resume"], env=env, stdout=logf, stderr=subprocess.STDOUT, check=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    ref = json.loads((Path(a.reference) / "rank0.json").read_text())
    res = {"killed_after_s": killed_s, "resumed_from": ranks[0]["resumed_from"],
           "losses": ranks[0]["losses"], "reference_losses": ref["losses"],
           "ranks_agree": all(r["ranks_agree"] for r in ranks),
           "max|adapter-reference|": tensors_differ(out / "adapter" / "adapter_model.safetensors",
                                                     Path(a.reference) / "adapter" / "adapter_model.safetensors"),
           "resumed_peak_gib": max(max(s["VmHWM"] for s in r["steps"]) for r in ranks),
           "resumed_step_s": [s["s"] for s in ranks[0]["steps"]]}
    print(json.dumps(res))
    (out / "resume.json").write_text(json.dumps(res, indent=1))


# ------------------------------------------------------------------------------------------------------ distill
def engine_captions(folder: Path, served: Path, images, ids, a) -> dict:
    """Greedy captions of ``images`` by the HF engine on the model ``folder`` and by the vLLM engine on its copy
    renamed as that engine serves it (made once in ``served``), in fp32, with the seconds each took."""
    from pipeline.core.rundir import publish_dir
    from pipeline.teacher.engines import HfEngine, VllmCaptionEngine
    from pipeline.teacher.loading import load_processor, load_teacher
    from pipeline.teacher.vllm_engine import EngineSettings, VllmEngine, convert_checkpoint

    kw = dict(samples=[0] * len(ids), seed=0, temperature=0.0, top_p=1.0, max_new_tokens=a.max_new_tokens)
    res, captions = {}, {}
    t0 = time.time()
    hf = HfEngine(load_teacher(folder, precision="fp32"), load_processor(folder))
    captions["hf"] = [g.caption for g in hf.generate(images, ids, **kw)]
    res["hf_s"] = round(time.time() - t0, 1)
    del hf
    if "vllm" in a.engines:
        if not (served / "config.json").is_file():
            with publish_dir(served) as tmp:
                convert_checkpoint(folder, tmp)
        settings = EngineSettings(model=str(served), dtype="float32", max_model_len=a.max_model_len,
                                  max_num_seqs=len(images), cpu_kv_cache_gb=2, threads=a.threads)
        t0 = time.time()
        engine = VllmCaptionEngine(VllmEngine(settings), load_processor(served))
        res["vllm_start_s"] = round(time.time() - t0, 1)
        try:
            t0 = time.time()
            captions["vllm"] = [g.caption for g in engine.generate(images, ids, **kw)]
            res["vllm_s"] = round(time.time() - t0, 1)
        finally:
            engine.close()
        res["identical"] = sum(x == y for x, y in zip(captions["hf"], captions["vllm"]))
    return res | {"captions": captions}


def cmd_distill(a):
    """Merge the run's adapter into the base (the project's ``merge_adapter``), check the merged model computes
    what the trained one did, then caption the rehearsal images greedily with the distill engines (``hf``, and
    ``vllm`` on the merged checkpoint renamed as the vLLM engine serves it). Two LoRA steps teach the model little
    more than a frequent word, so ``--untrained-too`` also captions with the random base, whose greedy tokens vary:
    the stronger check that both engines compute the same model."""
    import torch
    from PIL import Image

    from pipeline.teacher.loading import load_processor, load_teacher, merge_adapter

    torch.set_num_threads(a.threads)
    run = Path(a.run)
    merged = run / "merged"
    res = {"run": str(run)}
    t0 = time.time()
    if not (merged / "config.json").is_file():
        merge_adapter(Path(a.model), run / "adapter", merged, precision="fp32")
    res["merge_s"] = round(time.time() - t0, 1)
    rows = json.loads((Path(a.model) / "rows.json").read_text())[: a.images]
    batch = Collator(load_processor(merged))(rows[:1])
    batch.pop("labels")
    with torch.no_grad():
        logits = load_teacher(merged, precision="fp32")(**batch).logits.float()[0, -8:]
    res["max|merged-trained(in DS)|"] = float((logits - torch.load(run / "trained_logits.pt")).abs().max())
    images = [Image.open(r["image_path"]).convert("RGB") for r in rows]
    ids = [r["image_id"] for r in rows]
    res["fine-tuned"] = engine_captions(merged, run / "served", images, ids, a)
    if a.untrained_too:
        res["untrained"] = engine_captions(Path(a.model), run / "served-base", images, ids, a)
    print(json.dumps(res))
    (run / "distill.json").write_text(json.dumps(res, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=-1)  # the deepspeed launcher passes it before the subcommand
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--text-layers", type=int, default=2)
    b.add_argument("--vision-layers", type=int, default=2)
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--small", action="store_true", help="narrow widths, 56 px (16 image tokens): a bf16 smoke test")
    t = sub.add_parser("train")
    t.add_argument("--model", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--zero", type=int, choices=(2, 3), default=3, help="configs/deepspeed/zero<N>.json")
    t.add_argument("--steps", type=int, default=3)
    t.add_argument("--lr", type=float, default=1e-3, help="high, so that 3 steps change the logits visibly")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--precision", choices=("bf16", "fp32"), default="fp32")
    t.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    t.add_argument("--resume", action="store_true", help="from the last complete checkpoint in OUT/checkpoints")
    c = sub.add_parser("check")
    c.add_argument("--model", required=True)
    c.add_argument("--run", required=True)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--precision", choices=("bf16", "fp32"), default="fp32")
    r = sub.add_parser("resume")
    r.add_argument("--model", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--reference", required=True, help="an uninterrupted `train` run of the same settings")
    r.add_argument("--zero", type=int, choices=(2, 3), default=3)
    r.add_argument("--steps", type=int, default=2)
    r.add_argument("--port", type=int, default=29521)
    r.add_argument("--kill-delay", type=float, default=20.0, help="seconds after checkpoint 1 before the kill")
    d = sub.add_parser("distill")
    d.add_argument("--model", required=True)
    d.add_argument("--run", required=True)
    d.add_argument("--engines", nargs="+", choices=("hf", "vllm"), default=["hf", "vllm"])
    d.add_argument("--images", type=int, default=4)
    d.add_argument("--max-new-tokens", type=int, default=24)
    d.add_argument("--max-model-len", type=int, default=1024)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--untrained-too", action="store_true", help="also caption with the random base model")
    a = ap.parse_args()
    {"build": cmd_build, "train": cmd_train, "check": cmd_check, "resume": cmd_resume, "distill": cmd_distill}[a.cmd](a)


if __name__ == "__main__":
    main()
