"""Typed, validated pipeline configuration: YAML files plus dotted command-line overrides.

Every section forbids unknown keys, so a typo fails loudly with the dotted key that caused it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, model_validator

from pipeline.errors import PipelineError
from pipeline.rundir import RunDir


class ConfigError(PipelineError):
    """A configuration file or override is invalid; the message names the key."""


class Section(BaseModel):
    """Unknown keys, booleans given as numbers (and numbers as booleans), infinities and NaN are refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]  # becomes a folder name inside the run
Positive = Annotated[StrictInt, Field(gt=0)]
Rate = Annotated[StrictFloat, Field(gt=0)]  # learning rates, clip norms: finite and above zero


class SyntheticData(Section):
    """DeepFashion-lite: rendered images for real DeepFashion-MultiModal captions."""

    num_images: Positive = 2000
    image_size: StrictInt = Field(96, ge=32, le=1024)
    layout: Literal["single", "split"] = "single"
    captions: Path | None = None  # folder with train/test_captions.json; None = the bundled copy


class SplitConfig(Section):
    test: StrictFloat = Field(0.2, gt=0.0, lt=1.0)  # share of images held out for test (single captions.json layout)
    val: StrictFloat = Field(0.1, gt=0.0, lt=1.0)  # share of the train split carved out for validation


class DataConfig(Section):
    root: Path
    layout: Literal["auto", "single", "split"] = "auto"
    split: SplitConfig = SplitConfig()
    on_bad_record: Literal["skip", "fail"] = "skip"
    check_images: Literal["header", "decode"] = "decode"  # decode = full pixel decode per image
    workers: Positive = 2
    synthetic: SyntheticData | None = None  # when set and data.root is missing, DeepFashion-lite is generated there


class TinyTeacher(Section):
    """Shape of the small LLaVA the demo builds from scratch (Llama text model + CLIP vision tower)."""

    hidden_size: Positive = 128
    num_layers: Positive = 2
    num_heads: Positive = 4
    intermediate_size: Positive = 256
    vision_hidden_size: Positive = 64
    vision_layers: Positive = 2
    vision_heads: Positive = 4
    image_size: Positive = 64
    patch_size: Positive = 16
    vocab_extra: StrictInt = Field(0, ge=0)  # spare rows in the embedding matrix

    @model_validator(mode="after")
    def _check(self) -> TinyTeacher:
        for key, by in (("hidden_size", "num_heads"), ("vision_hidden_size", "vision_heads"),
                        ("image_size", "patch_size")):
            if getattr(self, key) % getattr(self, by):
                raise ValueError(f"teacher.tiny.{key}: {getattr(self, key)} is not divisible by teacher.tiny.{by}="
                                 f"{getattr(self, by)}")
        return self


class LoraConfig(Section):
    r: Positive = 8
    alpha: Positive = 16
    dropout: StrictFloat = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    train_projector: StrictBool = True  # multi_modal_projector fully trainable (saved via peft modules_to_save)
    modules_to_save: list[str] = []  # further fully trained modules, e.g. [lm_head, embed_tokens] for a random base


class TeacherTrain(Section):
    epochs: Rate = 1.0
    max_steps: StrictInt = Field(-1, ge=-1)  # -1: run `epochs`
    per_device_batch_size: Positive = 16
    gradient_accumulation_steps: Positive = 1
    learning_rate: Rate = 2e-5
    projector_learning_rate: Rate | None = None
    weight_decay: StrictFloat = Field(0.0, ge=0)
    warmup_ratio: StrictFloat = Field(0.03, ge=0, lt=1)
    lr_scheduler: str = "cosine"
    max_length: Positive = 2048
    gradient_checkpointing: StrictBool = True
    bf16: StrictBool = False
    fp16: StrictBool = False
    tf32: StrictBool = False
    eval_steps: Positive = 50
    save_steps: Positive = 50
    logging_steps: Positive = 10
    max_val_samples: StrictInt | None = Field(None, ge=0)
    deepspeed: Path | None = None  # a ZeRO config JSON, e.g. configs/deepspeed/zero2.json
    resume: StrictBool = True
    merge: StrictBool = False  # also write the merged model (merge_and_unload) in llava layout
    eval_generation_samples: StrictInt = Field(64, ge=0)  # held-out images captioned before/after to show it learned
    eval_max_new_tokens: Positive = 200  # token limit of those captions


class TeacherConfig(Section):
    model: Path  # base checkpoint folder in llava-hf layout
    tiny: TinyTeacher | None = None  # when set and `model` is missing, build a tiny LLaVA there
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    quantization: Literal["none", "4bit"] = "none"
    lora: LoraConfig = LoraConfig()
    train: TeacherTrain = TeacherTrain()


class DistillConfig(Section):
    temperature: StrictFloat = Field(0.2, ge=0.0)
    name: Name | None = None  # dataset name; default "precise" for T<0.5, else "creative"
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)  # 1.0 = plain temperature sampling (LLaVA's own eval scripts)
    max_new_tokens: Positive = 200
    batch_size: Positive = 16
    backend: Literal["transformers"] = "transformers"  # batched HF generate (a vLLM backend is not built yet)
    # what `make demo` / `make submit` run
    temperatures: dict[Name, Annotated[StrictFloat, Field(ge=0.0)]] = {"precise": 0.2, "creative": 0.9}

    @property
    def dataset_name(self) -> str:
        if self.name:
            return self.name
        return "precise" if self.temperature < 0.5 else "creative"


class EncoderSettings(Section):
    pretrained: StrictBool = False  # ImageNet weights from the local torch cache or `weights_dir`
    weights_dir: Path | None = None
    finetune: StrictBool = False  # train the encoder too (then features are not cached)
    width: Rate = 1.0  # demo: scale of the randomly initialised small encoders
    image_size: StrictInt = Field(224, ge=32, le=1024)


class StudentsConfig(Section):
    archs: list[str] = ["vgg19_gru", "resnet101_gru", "resnet101_attn_gru", "vit_transformer"]
    sources: list[Name] | None = None  # caption sources; None = gt + every distilled dataset in the run
    encoder: EncoderSettings = EncoderSettings()
    embed_dim: Positive = 512
    hidden_dim: Positive = 512
    num_layers: Positive = 1
    dropout: StrictFloat = Field(0.5, ge=0, lt=1)
    min_word_count: Positive = 5
    max_length: StrictInt = Field(100, gt=1)
    epochs: Positive = 10
    batch_size: Positive = 64
    encoder_lr: Rate = 1e-5
    decoder_lr: Rate = 5e-4
    grad_clip: Rate = 5.0  # max gradient norm
    attention_reg: StrictFloat = Field(1.0, ge=0)  # doubly-stochastic attention regulariser weight
    beam_size: Positive = 5
    val_every_epochs: Positive = 1
    val_every_steps: Positive | None = None  # validate every N optimizer steps instead of epochs
    val_beam_size: Positive = 1
    early_stop_patience: Positive = 3  # stop after this many validations without a better val CIDEr-D
    transformer_layers: Positive = 3
    transformer_heads: Positive = 8
    num_workers: StrictInt = Field(0, ge=0)  # image-decoding workers (feature cache; the encoder-in-the-loop batches)

    @model_validator(mode="after")
    def _check(self) -> StudentsConfig:
        if self.hidden_dim % self.transformer_heads:
            raise ValueError(f"students.hidden_dim: {self.hidden_dim} is not divisible by students.transformer_heads="
                             f"{self.transformer_heads}")
        if "vit_transformer" in self.archs and self.encoder.image_size % 16:
            raise ValueError(f"students.encoder.image_size: {self.encoder.image_size} is not a multiple of 16 "
                             "(the ViT's patch size)")
        return self


class ReportConfig(Section):
    gallery_size: Positive = 12


class SlurmConfig(Section):
    partition: str | None = None
    account: str | None = None
    time: dict[str, str] = {"default": "04:00:00"}
    gpus_per_node: StrictInt = Field(1, ge=0)
    nodes: dict[str, Positive] = {"finetune": 1}
    cpus_per_task: Positive = 2
    mem: str | None = None
    distill_shards: Positive = 1
    setup: list[str] = ["source .venv/bin/activate"]  # shell lines before each job (cwd: the project root)
    extra_args: list[str] = []


class Config(Section):
    run_dir: Path
    seed: StrictInt = Field(0, ge=0, le=2**32 - 1)  # numpy's seeding takes 32 bits
    data: DataConfig
    teacher: TeacherConfig
    distill: DistillConfig = DistillConfig()
    students: StudentsConfig = StudentsConfig()
    report: ReportConfig = ReportConfig()
    slurm: SlurmConfig = SlurmConfig()

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.teacher.train.bf16 and self.teacher.train.fp16:
            raise ValueError("teacher.train.bf16 and teacher.train.fp16 are both true; choose one")
        for key, path in (("data.root", self.data.root), ("teacher.model", self.teacher.model)):
            for output in RunDir(self.run_dir).output_folders():
                if Path(os.path.abspath(path)).is_relative_to(os.path.abspath(output)):
                    raise ValueError(f"{key}: {path} is inside {output}, an output folder the pipeline replaces; "
                                     "put it elsewhere")
        return self


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        if e["type"] == "value_error":  # a cross-field check: its message starts with the key
            lines.append(f"{source}: {e['ctx']['error']}")
            continue
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{source}: {key}: {msg}")
    return "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and YAML-typed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {exc}") from exc
    return parts, value


def apply_override(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


RUN_DIR_VARIABLE = "${run_dir}"


def interpolate_run_dir(node: Any, run_dir: str) -> Any:
    """Replace ``${run_dir}`` in every string of the tree, so paths inside a run follow a ``run_dir`` override."""
    if isinstance(node, dict):
        return {k: interpolate_run_dir(v, run_dir) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_run_dir(v, run_dir) for v in node]
    return node.replace(RUN_DIR_VARIABLE, run_dir) if isinstance(node, str) else node


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, resolve ``${run_dir}``, and validate the result."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    for text in overrides:
        apply_override(tree, *parse_override(text))
    run_dir = tree.get("run_dir")
    if isinstance(run_dir, str):
        if RUN_DIR_VARIABLE in run_dir:
            raise ConfigError(f"{path}: run_dir cannot refer to {RUN_DIR_VARIABLE}")
        tree = interpolate_run_dir(tree, run_dir)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, str(path))) from None


def config_slice(cfg: Config, *sections: str) -> dict[str, Any]:
    """JSON-ready copy of the named top-level sections (recorded in stage manifests)."""
    dumped = cfg.model_dump(mode="json")
    return {name: dumped[name] for name in sections}
