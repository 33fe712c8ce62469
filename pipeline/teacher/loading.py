"""Load a LLaVA teacher from a local llava-hf layout folder (base, base + LoRA adapter, or merged), no hub access."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.rundir import publish_dir

log = logging.getLogger(__name__)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class TeacherError(PipelineError):
    """The teacher checkpoint or adapter is missing or unusable."""


def check_checkpoint(path: Path) -> None:
    if not path.is_dir():
        raise TeacherError(f"teacher checkpoint {path} does not exist (teacher.model must be a local folder in "
                           "llava-hf layout, e.g. a downloaded llava-1.5-13b-hf)")
    if not (path / "config.json").is_file():
        raise TeacherError(f"teacher checkpoint {path} has no config.json: not a Hugging Face model folder")


def finetuned_teacher(base: Path, teacher_dir: Path) -> tuple[Path, Path | None]:
    """(model folder, adapter folder or None) of the finetune stage's output ``teacher_dir``: the merged model when
    it wrote one, else its LoRA adapter over the ``base`` checkpoint."""
    merged = teacher_dir / "merged"
    if (merged / "config.json").is_file():
        return merged, None
    return base, teacher_dir / "adapter"


def load_processor(path: str | Path, padding_side: str = "right"):
    from transformers import AutoProcessor

    path = Path(path)
    if not path.is_dir():
        raise TeacherError(f"processor folder {path} does not exist")
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    processor.tokenizer.padding_side = padding_side
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.unk_token or processor.tokenizer.eos_token
    return processor


def load_base_model(path: str | Path, precision: str = "bf16", attn_implementation: str = "sdpa",
                    quantization: str = "none", device_map=None):
    """`LlavaForConditionalGeneration` from a local folder; ``quantization="4bit"`` loads nf4 + double quant."""
    import torch
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    path = Path(path)
    check_checkpoint(path)
    dtype = getattr(torch, DTYPES[precision])
    kwargs = {}
    if quantization == "4bit":
        compute = dtype if dtype != torch.float32 else torch.bfloat16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=[".*vision_tower", ".*multi_modal_projector", "lm_head"])
    try:
        return LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=False,
            local_files_only=True, device_map=device_map, **kwargs)
    except (OSError, ValueError) as exc:
        raise TeacherError(f"cannot load teacher checkpoint {path}: {exc}") from exc


def load_teacher(base: str | Path, adapter: str | Path | None = None, *, precision: str = "bf16",
                 attn_implementation: str = "sdpa", device_map=None, merge: bool = False):
    """Base model with the LoRA adapter applied (or a merged model when ``adapter`` is None), in eval mode.
    ``merge`` folds the adapter into the weights in memory: same outputs, no extra LoRA matmuls per token."""
    model = load_base_model(base, precision, attn_implementation, device_map=device_map)
    if adapter is not None:
        from peft import PeftModel

        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise TeacherError(f"LoRA adapter {adapter} not found (no adapter_config.json); run 'finetune' first")
        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
        if merge:
            model = model.merge_and_unload()
    return model.eval()


def merge_adapter(base: Path, adapter: Path, out: Path, *, precision: str) -> None:
    """Publish ``base`` with the LoRA ``adapter`` folded in, and the adapter's processor, as the model folder ``out``
    (llava-hf layout)."""
    model = load_teacher(base, adapter, precision=precision)
    merged = model.merge_and_unload()
    with publish_dir(out) as tmp:
        merged.save_pretrained(tmp)
        load_processor(adapter).save_pretrained(tmp)
