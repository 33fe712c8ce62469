"""Load an image-text-to-text teacher from a local folder (base, base + LoRA adapter, or merged), no hub access,
no remote code: ``AutoModelForImageTextToText`` + ``AutoProcessor``, so any family transformers ships (LLaVA-1.5,
LLaVA-NeXT, Qwen2/2.5-VL, Idefics3/SmolVLM, ...) goes through the same code.

The parts of a model (vision tower, projector, language model) are found from the model itself
(``get_encoder(modality="image")``, ``get_decoder()``, and what else the inner model holds), never from a table of
family names: :func:`model_parts`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.rundir import publish_dir

log = logging.getLogger(__name__)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# a projector inside the vision tower (Qwen2-VL's patch merger) goes by one of these names
INNER_PROJECTORS = ("merger", "multi_modal_projector", "connector")


class TeacherError(PipelineError):
    """The teacher checkpoint or adapter is missing or unusable."""


def check_checkpoint(path: Path) -> None:
    if not path.is_dir():
        raise TeacherError(f"teacher checkpoint {path} does not exist (teacher.model must be a local Hugging Face "
                           "model folder of an image-text-to-text model, e.g. a downloaded llava-1.5-13b-hf)")
    if not (path / "config.json").is_file():
        raise TeacherError(f"teacher checkpoint {path} has no config.json: not a Hugging Face model folder")


def finetuned_teacher(base: Path, teacher_dir: Path) -> tuple[Path, Path | None]:
    """(model folder, adapter folder or None) of the finetune stage's output ``teacher_dir``: the merged model when
    it wrote one, else its LoRA adapter over the ``base`` checkpoint."""
    merged = teacher_dir / "merged"
    if (merged / "config.json").is_file():
        return merged, None
    return base, teacher_dir / "adapter"


def load_generation_config(path: str | Path):
    """The checkpoint's ``generation_config.json`` (its end tokens, one or a list), or None where it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:
        return None


def load_processor(path: str | Path, padding_side: str = "right"):
    """The checkpoint's processor (tokenizer + image processor + chat template) from a local folder."""
    from transformers import AutoProcessor

    path = Path(path)
    if not path.is_dir():
        raise TeacherError(f"processor folder {path} does not exist")
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, TypeError, ImportError) as exc:  # ImportError: a package the processor needs
        raise TeacherError(f"cannot load the processor of {path}: {exc}") from exc
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise TeacherError(f"{path}: {type(processor).__name__} is not an image-text processor (no tokenizer and "
                           "image processor); teacher.model must be an image-text-to-text checkpoint")
    if not getattr(processor, "chat_template", None):
        raise TeacherError(f"{path}: the processor has no chat template (chat_template.json or "
                           "chat_template.jinja); the prompt is built from it")
    processor.tokenizer.padding_side = padding_side
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.unk_token or processor.tokenizer.eos_token
    return processor


@dataclass
class ModelParts:
    """Qualified module names of a loaded image-text-to-text model's parts."""

    vision: str  # the vision tower, e.g. model.vision_tower / model.visual / model.vision_model
    language_model: str  # e.g. model.language_model / model.text_model
    projector: list[str]  # e.g. [model.multi_modal_projector], [model.visual.merger], [model.connector]


def model_parts(model) -> ModelParts:
    """Find the vision tower, language model and projector(s) of ``model`` (or of a peft model's base) from the
    model's own accessors: the projector is what the inner model holds besides the other two, or, when it holds
    nothing else (Qwen2-VL), the tower's child named like a projector."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = {id(m): n for n, m in model.named_modules()}
    try:
        vision, lm = base.get_encoder(modality="image"), base.get_decoder()
    except (AttributeError, TypeError, ValueError) as exc:
        raise TeacherError(f"{type(base).__name__}: no vision tower / language model found ({exc})") from exc
    inner = getattr(base, "model", base)
    if vision is inner or lm is inner or id(vision) not in names or id(lm) not in names:
        raise TeacherError(f"{type(base).__name__}: no separate vision tower and language model found")
    projector = [names[id(m)] for m in inner.children() if m is not vision and m is not lm and id(m) in names]
    if not projector:
        projector = [f"{names[id(vision)]}.{n}" for n, _ in vision.named_children() if n in INNER_PROJECTORS]
    return ModelParts(names[id(vision)], names[id(lm)], projector)


def config_parts(path: Path) -> ModelParts:
    """:func:`model_parts` of the model a checkpoint folder describes, built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    with torch.device("meta"):
        return model_parts(AutoModelForImageTextToText.from_config(config))


def load_base_model(path: str | Path, precision: str = "bf16", attn_implementation: str = "sdpa",
                    quantization: str = "none", device_map=None):
    """The image-text-to-text model in a local folder; ``quantization="4bit"`` loads the language model in nf4 +
    double quant (the vision tower, projector and head stay in ``precision``)."""
    import torch
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    path = Path(path)
    check_checkpoint(path)
    dtype = getattr(torch, DTYPES[precision])
    kwargs = {}
    try:
        if quantization == "4bit":
            parts = config_parts(path)
            compute = dtype if dtype != torch.float32 else torch.bfloat16
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=[parts.vision, *parts.projector, "lm_head"])
        return AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=False,
            local_files_only=True, device_map=device_map, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise TeacherError(f"cannot load teacher checkpoint {path} as an image-text-to-text model: {exc}") from exc


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
    """Publish ``base`` with the LoRA ``adapter`` (and trained projector) folded in, and the adapter's processor, as
    the model folder ``out`` (the base's layout: loads with ``AutoModelForImageTextToText``)."""
    model = load_teacher(base, adapter, precision=precision)
    merged = model.merge_and_unload()
    with publish_dir(out) as tmp:
        merged.save_pretrained(tmp)
        load_processor(adapter).save_pretrained(tmp)
