"""Typed, validated pipeline configuration: YAML files plus dotted command-line overrides.

A file may name ``base: <path relative to itself>`` and set only what differs: mappings merge key by key, lists
and scalars replace, bases may have bases. Every section forbids unknown keys, so a typo fails loudly with the
dotted key that caused it and the file (or override) it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import PipelineError


class ConfigError(PipelineError):
    """A configuration file or override is invalid; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticData(Section):
    """DeepFashion-lite: rendered images for real DeepFashion-MultiModal captions."""

    num_images: int = Field(2000, gt=0)
    image_size: int = Field(96, ge=32, le=1024)
    layout: Literal["single", "split"] = "single"
    captions: Path | None = None  # folder with train/test_captions.json; None = the bundled copy


class SplitConfig(Section):
    test: float = Field(0.2, gt=0.0, lt=1.0)  # share of images held out for test (single captions.json layout)
    val: float = Field(0.1, gt=0.0, lt=1.0)  # share of the train split carved out for validation


class DataConfig(Section):
    root: Path
    layout: Literal["auto", "single", "split"] = "auto"
    split: SplitConfig = SplitConfig()
    on_bad_record: Literal["skip", "fail"] = "skip"
    check_images: Literal["header", "decode"] = "decode"  # decode = full pixel decode per image
    workers: int = Field(2, ge=1)
    synthetic: SyntheticData | None = None  # when set, DeepFashion-lite is generated into data.root if missing


class TinyTeacher(Section):
    """Shape of the small LLaVA the demo builds from scratch (Llama text model + CLIP vision tower)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    image_size: int = 64
    patch_size: int = 16
    vocab_extra: int = 0  # spare rows in the embedding matrix


class LoraConfig(Section):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    train_projector: bool = True  # multi_modal_projector fully trainable (saved via peft modules_to_save)
    modules_to_save: list[str] = []  # further fully trained modules, e.g. [lm_head, embed_tokens] for a random base


class TeacherTrain(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    per_device_batch_size: int = Field(16, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(2e-5, gt=0)
    projector_learning_rate: float | None = None
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    lr_scheduler: str = "cosine"
    max_length: int = Field(2048, gt=0)
    gradient_checkpointing: bool = True
    bf16: bool = False
    fp16: bool = False
    tf32: bool = False
    eval_steps: int = Field(50, gt=0)
    save_steps: int = Field(50, gt=0)
    logging_steps: int = Field(10, gt=0)
    max_val_samples: int | None = None
    deepspeed: Path | None = None  # a ZeRO config JSON, e.g. configs/deepspeed/zero2.json
    resume: bool = True
    merge: bool = False  # also write the merged model (merge_and_unload) in llava layout
    eval_generation_samples: int = 64  # held-out images captioned before/after training to show it learned


class TeacherConfig(Section):
    model: Path  # base checkpoint folder in llava-hf layout
    tiny: TinyTeacher | None = None  # when set and `model` is missing, build a tiny LLaVA there
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    quantization: Literal["none", "4bit"] = "none"
    lora: LoraConfig = LoraConfig()
    train: TeacherTrain = TeacherTrain()


class DistillConfig(Section):
    temperature: float = Field(0.2, ge=0.0)
    name: str | None = None  # dataset name; default "precise" for T<0.5, else "creative"
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # 1.0 = plain temperature sampling (LLaVA's own eval scripts)
    max_new_tokens: int = Field(200, gt=0)
    batch_size: int = Field(16, gt=0)
    backend: Literal["transformers"] = "transformers"  # batched HF generate (a vLLM backend is not built yet)
    temperatures: dict[str, float] = {"precise": 0.2, "creative": 0.9}  # what `make demo` / `make submit` run

    @property
    def dataset_name(self) -> str:
        if self.name:
            return self.name
        return "precise" if self.temperature < 0.5 else "creative"


class EncoderSettings(Section):
    pretrained: bool = False  # ImageNet weights from the local torch cache or `weights_dir`
    weights_dir: Path | None = None
    finetune: bool = False  # train the encoder too (then features are not cached)
    width: float = Field(1.0, gt=0)  # demo: scale of the randomly initialised small encoders
    image_size: int = 224


class StudentsConfig(Section):
    archs: list[str] = ["vgg19_gru", "resnet101_gru", "resnet101_attn_gru", "vit_transformer"]
    sources: list[str] | None = None  # caption sources; None = gt + every distilled dataset in the run
    encoder: EncoderSettings = EncoderSettings()
    embed_dim: int = 512
    hidden_dim: int = 512
    num_layers: int = 1
    dropout: float = Field(0.5, ge=0, lt=1)
    min_word_count: int = Field(5, ge=1)
    max_length: int = Field(100, gt=1)
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0)
    encoder_lr: float = 1e-5
    decoder_lr: float = 5e-4
    grad_clip: float = 5.0
    attention_reg: float = 1.0  # doubly-stochastic attention regulariser weight
    beam_size: int = Field(5, gt=0)
    val_every_epochs: int = Field(1, gt=0)
    val_every_steps: int | None = Field(None, gt=0)  # validate every N optimizer steps instead of epochs
    val_beam_size: int = Field(1, gt=0)
    early_stop_patience: int = Field(3, gt=0)  # stop after this many validations without a better val CIDEr-D
    transformer_layers: int = 3
    transformer_heads: int = 8
    num_workers: int = Field(0, ge=0)  # image-decoding workers (feature cache; the encoder-in-the-loop batches)


class CaptionConfig(Section):
    """`make caption`: captioning a user's own images with a student (or the teacher)."""

    batch_size: int = Field(32, gt=0)
    max_pixels: int = Field(40_000_000, gt=0)  # larger images are skipped, not decoded (PIL refuses > ~179M anyway)


class ReportConfig(Section):
    gallery_size: int = Field(12, gt=0)


class SlurmConfig(Section):
    partition: str | None = None
    account: str | None = None
    time: dict[str, str] = {"default": "04:00:00"}
    gpus_per_node: int = 1
    nodes: dict[str, int] = {"finetune": 1}
    cpus_per_task: int = 2
    mem: str | None = None
    distill_shards: int = 1
    setup: list[str] = ["source .venv/bin/activate"]  # shell lines before each job (cwd: the project root)
    extra_args: list[str] = []


class Config(Section):
    run_dir: Path
    seed: int = 0
    data: DataConfig
    teacher: TeacherConfig
    distill: DistillConfig = DistillConfig()
    students: StudentsConfig = StudentsConfig()
    report: ReportConfig = ReportConfig()
    caption: CaptionConfig = CaptionConfig()
    slurm: SlurmConfig = SlurmConfig()

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.teacher.train.bf16 and self.teacher.train.fp16:
            raise ValueError("teacher.train.bf16 and teacher.train.fp16 are both true; choose one")
        return self


Origins = dict[tuple[str, ...], str]  # key path -> the file (or "override") that set it


def _source(origins: Origins, loc: tuple, default: str) -> str:
    """Where the value at ``loc`` (or its nearest set parent) came from; ``default`` for what no file set."""
    key = tuple(str(p) for p in loc)
    for n in range(len(key), 0, -1):
        if key[:n] in origins:
            return origins[key[:n]]
    return default


def _format_error(err: ValidationError, origins: Origins, default: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{_source(origins, e['loc'], default)}: {key}: {msg}")
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


def _origins(tree: dict[str, Any], source: str, prefix: tuple[str, ...] = ()) -> Origins:
    """Every key path of ``tree`` (sections too), attributed to ``source``."""
    out: Origins = {}
    for key, value in tree.items():
        out[(*prefix, str(key))] = source
        if isinstance(value, dict):
            out.update(_origins(value, source, (*prefix, str(key))))
    return out


def merge_trees(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merge key by key, lists and scalars replace."""
    merged = dict(base)
    for key, value in child.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = merge_trees(merged[key], value) if both else value
    return merged


def _read_tree(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], Origins]:
    """The YAML mapping in ``path`` over its chain of ``base:`` files, and the file each key came from."""
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    base = tree.pop("base", None)
    origins = _origins(tree, str(path))
    if base is None:
        return tree, origins
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected the path of a config file, got {base!r}")
    base_path, chain = path.parent / base, (*chain, path.resolve())
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: config file {base_path} does not exist")
    if base_path.resolve() in chain:
        raise ConfigError(f"{path}: base: {base} leads back to {base_path.resolve()} (a cycle)")
    base_tree, base_origins = _read_tree(base_path, chain)
    return merge_trees(base_tree, tree), {**base_origins, **origins}


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (over its ``base:`` chain), apply ``key=value`` overrides, resolve ``${run_dir}``, and
    validate the result."""
    path = Path(path)
    tree, origins = _read_tree(path)
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(tree, parts, value)
        for n in range(1, len(parts)):  # sections the override creates
            origins.setdefault(tuple(parts[:n]), "override")
        origins.update(_origins({parts[-1]: value}, "override", tuple(parts[:-1])))
    run_dir = tree.get("run_dir")
    if isinstance(run_dir, str):
        if RUN_DIR_VARIABLE in run_dir:
            raise ConfigError(f"{_source(origins, ('run_dir',), str(path))}: run_dir cannot refer to "
                              f"{RUN_DIR_VARIABLE}")
        tree = interpolate_run_dir(tree, run_dir)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origins, str(path))) from None


def config_slice(cfg: Config, *sections: str) -> dict[str, Any]:
    """JSON-ready copy of the named top-level sections (recorded in stage manifests)."""
    dumped = cfg.model_dump(mode="json")
    return {name: dumped[name] for name in sections}
