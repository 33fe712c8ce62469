"""LoRA / QLoRA fine-tuning of an image-text-to-text teacher with the HF Trainer (optionally under DeepSpeed ZeRO-2/3).

Only the language model's linear layers get LoRA adapters: vision towers have same-named projections, so targets are
matched by a regex anchored at the language model's own module name (``model.language_model``, ``model.text_model``,
found by :func:`pipeline.teacher.loading.model_parts`). The projector (``multi_modal_projector``, Qwen2-VL's
``merger``, Idefics3's ``connector``) is optionally fully trainable and saved through peft's ``modules_to_save``, so
every checkpoint holds everything that was trained.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from pipeline.core.config import TeacherConfig
from pipeline.data.images import load_rgb
from pipeline.teacher.collator import CaptionCollator, PromptLengths, answer_ids, eos_token_ids
from pipeline.teacher.loading import INNER_PROJECTORS, TeacherError, load_base_model, model_parts

log = logging.getLogger(__name__)
EXIF_ORIENTATION, SWAPS_SIDES = 274, (5, 6, 7, 8)  # orientations that turn the image by 90 degrees


class CaptionImages(torch.utils.data.Dataset):
    """Rows with image_path/caption/image_id -> {"image", "caption", "image_id"} (images read lazily)."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.rows[i]
        return {"image": load_rgb(r["image_path"]), "caption": r["caption"], "image_id": r["image_id"]}


def upright_size(path: str) -> tuple[int, int]:
    """(width, height) of the image at ``path`` as :func:`load_rgb` returns it (EXIF orientation applied), read from
    its header."""
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        turned = im.getexif().get(EXIF_ORIENTATION) in SWAPS_SIDES
    return (height, width) if turned else (width, height)


def split_too_long(rows: list[dict[str, Any]], processor, max_length: int,
                   eos_ids: list[int]) -> tuple[list, list[dict[str, Any]]]:
    """Rows that fit ``max_length`` whole (prompt + the image's tokens at its size + caption + end token), and a report
    of those that don't (never cut: a cut through the image tokens breaks the model, a cut caption teaches it to
    stop short)."""
    lengths = PromptLengths(processor)
    keep, too_long = [], []
    for r in rows:
        size = upright_size(r["image_path"])
        n_prompt, n_answer = lengths(size), len(answer_ids(processor, r["caption"], eos_ids))
        if n_prompt + n_answer <= max_length:
            keep.append(r)
        else:
            too_long.append({"image_id": r["image_id"], "tokens": n_prompt + n_answer,
                             "image_tokens": lengths.image_tokens.get(size), "caption_tokens": n_answer})
    return keep, too_long


def last_complete_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing. It writes trainer_state.json last, so a run killed while
    saving leaves a folder without it (``get_last_checkpoint`` would pick that folder and fail on resume)."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted((int(p.name.split("-")[1]), p) for p in ckpt_dir.glob("checkpoint-*") if p.name[11:].isdigit())
    for _, path in reversed(found):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            log.warning("ignoring incomplete checkpoint %s", path)
            continue
        return str(path)
    return None


def lora_target_regex(language_model: str, modules: list[str]) -> str:
    """The linear layers named ``modules`` inside the module ``language_model`` (a full module name), as peft's
    regex (matched against whole names)."""
    return rf"{re.escape(language_model)}\.(?:.*\.)?({'|'.join(map(re.escape, modules))})"


def build_peft_model(cfg: TeacherConfig, model):
    """``model`` with LoRA on its language model's ``teacher.lora.target_modules`` and, with
    ``teacher.lora.train_projector``, its projector fully trainable."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    parts = model_parts(model)
    target = lora_target_regex(parts.language_model, cfg.lora.target_modules)
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              and n.startswith(parts.language_model + ".")}
    if not any(re.fullmatch(target, n) for n, _ in model.named_modules()):
        raise TeacherError(f"teacher.lora.target_modules {cfg.lora.target_modules} name no linear layer of the "
                           f"language model {parts.language_model}; its linear layers are {sorted(linear)}")
    if cfg.lora.train_projector and not parts.projector:
        raise TeacherError(f"teacher.lora.train_projector: {type(model).__name__} has no projector module to train")
    projector = [p.rsplit(".", 1)[-1] for p in parts.projector] if cfg.lora.train_projector else []
    if cfg.quantization == "4bit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias="none",
                      target_modules=target, task_type="CAUSAL_LM",
                      modules_to_save=projector + cfg.lora.modules_to_save or None)
    model = get_peft_model(model, lora)
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()  # else "element 0 of tensors does not require grad" with frozen embeds
    return model


class TeacherTrainer(Trainer):
    """HF Trainer with an optional separate learning rate for the projector (LLaVA-1.5's recipe): the parameters
    inside a module named one of ``projector`` (e.g. the ``parts.projector`` names' last components)."""

    def __init__(self, *args, projector_lr: float | None = None, projector: Sequence[str] = INNER_PROJECTORS,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        self.projector = tuple(projector)

    def is_projector(self, name: str) -> bool:
        return any(f".{p}." in f".{name}" for p in self.projector)

    def create_optimizer(self, model=None):
        if self.projector_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in opt_model.named_parameters():
            if p.requires_grad:
                groups.setdefault((self.is_projector(name), name in decay), []).append(p)
        param_groups = [{"params": ps, "weight_decay": self.args.weight_decay if dec else 0.0,
                         **({"lr": self.projector_lr} if proj else {})} for (proj, dec), ps in groups.items()]
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = cls(param_groups, **kwargs)
        return self.optimizer


def training_arguments(cfg: TeacherConfig, output_dir: Path, seed: int, has_val: bool,
                       resuming: bool) -> TrainingArguments:
    t = cfg.train
    use_cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir), seed=seed, data_seed=seed,
        num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_batch_size, per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler,
        bf16=t.bf16 and (use_cuda or cfg.precision == "bf16"), fp16=t.fp16 and use_cuda,
        tf32=t.tf32 if use_cuda else None,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        eval_strategy="steps" if has_val else "no", eval_steps=t.eval_steps,
        eval_on_start=has_val and not resuming,  # the "before" loss, kept in the checkpointed log history
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=2,
        logging_strategy="steps", logging_steps=t.logging_steps, logging_first_step=True,
        report_to=["tensorboard"], remove_unused_columns=False, dataloader_num_workers=0,
        deepspeed=str(t.deepspeed) if t.deepspeed else None,
        use_cpu=not use_cuda, disable_tqdm=False,
    )


def zero_stage(deepspeed: Path | None) -> int | None:
    """The ZeRO stage of a DeepSpeed config file (None without one)."""
    if deepspeed is None:
        return None
    try:
        return int(json.loads(Path(deepspeed).read_text())["zero_optimization"]["stage"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TeacherError(f"teacher.train.deepspeed {deepspeed}: no zero_optimization.stage ({exc})") from None


def leave_process_group() -> None:
    """All ranks leave the process group together (the other ranks then exit while rank 0 goes on to evaluate and
    merge): a process that exits with a gloo group still up can abort at shutdown ("terminate called without an
    active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def finetune(cfg: TeacherConfig, train_rows: list[dict], val_rows: list[dict], out_dir: Path, seed: int) -> dict:
    """Train LoRA adapters; returns figures (losses, throughput). Checkpoints go to ``out_dir/checkpoints``."""
    from transformers import set_seed

    from pipeline.teacher.loading import load_generation_config, load_processor

    set_seed(seed)
    processor = load_processor(cfg.model)
    eos_ids = eos_token_ids(processor, load_generation_config(cfg.model))  # none: the tokenizer's EOS
    train_rows, too_long = split_too_long(train_rows, processor, cfg.train.max_length, eos_ids)
    val_rows, val_too_long = split_too_long(val_rows, processor, cfg.train.max_length, eos_ids)
    if too_long or val_too_long:
        log.warning("%d train / %d val samples exceed teacher.train.max_length=%d and are left out (not cut): %s",
                    len(too_long), len(val_too_long), cfg.train.max_length, (too_long + val_too_long)[:5])
    if not train_rows:
        raise TeacherError(f"no train sample fits teacher.train.max_length={cfg.train.max_length} (e.g. "
                           f"{too_long[:1]}); raise it")
    if cfg.train.max_val_samples is not None:
        val_rows = val_rows[: cfg.train.max_val_samples]

    model = load_base_model(cfg.model, cfg.precision, cfg.attn_implementation, cfg.quantization)
    model.config.use_cache = False
    projector = [p.rsplit(".", 1)[-1] for p in model_parts(model).projector]
    model = build_peft_model(cfg, model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %d of %d (%.3f%%)", trainable, total, 100 * trainable / total)

    ckpt_dir = out_dir / "checkpoints"
    last = last_complete_checkpoint(ckpt_dir) if cfg.train.resume else None
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out_dir / "tensorboard"))
    args = training_arguments(cfg, ckpt_dir, seed, has_val=bool(val_rows), resuming=last is not None)
    trainer = TeacherTrainer(model=model, args=args, train_dataset=CaptionImages(train_rows),
                             eval_dataset=CaptionImages(val_rows) if val_rows else None,
                             data_collator=CaptionCollator(processor, cfg.train.max_length, eos_ids=eos_ids),
                             projector_lr=cfg.train.projector_learning_rate, projector=projector)
    if last:
        log.info("resuming from %s", last)
    result = trainer.train(resume_from_checkpoint=last)
    final_eval = trainer.evaluate()["eval_loss"] if val_rows else None
    adapter_dir = out_dir / "adapter"
    if zero_stage(cfg.train.deepspeed) == 3:
        trainer.save_model(str(adapter_dir))  # gathers the partitioned LoRA/projector weights (only those) first
    elif trainer.is_world_process_zero():
        # every rank holds the whole adapter; trainer.save_model would copy the whole model to host memory on every
        # rank first (accelerate's get_state_dict under DeepSpeed): 27 GB a rank for 13B
        trainer.model.save_pretrained(str(adapter_dir))
    if trainer.is_world_process_zero():
        processor.save_pretrained(adapter_dir)
    if cfg.train.deepspeed:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # later from_pretrained calls (evaluation, merge) must not build ZeRO-3 shards
    # every evaluation, the one before training first (restored from the checkpoint on resume)
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    leave_process_group()
    return {
        "train_samples": len(train_rows), "val_samples": len(val_rows),
        "too_long": too_long + val_too_long, "resumed_from": Path(last).name if last else None,
        "trainable_parameters": trainable, "total_parameters": total,
        "train_loss": result.training_loss, "global_steps": trainer.state.global_step,
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "first_eval_loss": evals[0] if evals else None, "final_eval_loss": final_eval, "eval_losses": evals,
        "is_main_process": trainer.is_world_process_zero(),
    }

