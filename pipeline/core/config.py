"""Typed, validated pipeline configuration: YAML files plus dotted command-line overrides.

A file may name ``base: <path relative to itself>`` and set only what differs: mappings merge key by key, lists
and scalars replace, bases may have bases. Every section forbids unknown keys, so a typo fails loudly with the
dotted key that caused it and the file (or override) it came from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, model_validator

from pipeline.core.archs import ARCHS, ENCODERS
from pipeline.core.errors import PipelineError
from pipeline.core.rundir import SWEEP_PREFIX, RunDir


class ConfigError(PipelineError):
    """A configuration file or override is invalid; the message names the key."""


class Section(BaseModel):
    """Unknown keys, booleans given as numbers (and numbers as booleans), infinities and NaN are refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]  # becomes a folder name inside the run
Positive = Annotated[StrictInt, Field(gt=0)]
Rate = Annotated[StrictFloat, Field(gt=0)]  # learning rates, clip norms: finite and above zero
Arch = Literal[tuple(ARCHS)]  # a student architecture: a row of pipeline.core.archs.ARCHS
EncoderName = Literal[ENCODERS]  # an encoder family of that table


class SyntheticData(Section):
    """DeepFashion-lite: rendered images for real DeepFashion-MultiModal captions."""

    num_images: Positive = 2000
    image_size: StrictInt = Field(96, ge=32, le=1024)
    layout: Literal["single", "split"] = "single"
    captions: Path | None = None  # folder with train/test_captions.json; None = the bundled copy


class SplitConfig(Section):
    test: StrictFloat = Field(0.2, gt=0.0, lt=1.0)  # share of images held out for test (single captions.json layout)
    val: StrictFloat = Field(0.1, gt=0.0, lt=1.0)  # share of the train split carved out for validation


class PretrainingImages(Section):
    """Rendered images of real captions that are in no split: what the demo's pretraining stand-ins (the tiny
    LLaVA's and the students' encoders') train on, as real checkpoints were pretrained on other data."""

    images: Positive = 2000
    root: Path


class DataConfig(Section):
    root: Path
    layout: Literal["auto", "single", "split"] = "auto"
    split: SplitConfig = SplitConfig()
    on_bad_record: Literal["skip", "fail"] = "skip"
    check_images: Literal["header", "decode"] = "decode"  # decode = full pixel decode per image
    workers: Positive = 2
    synthetic: SyntheticData | None = None  # when set and data.root is missing, DeepFashion-lite is generated there
    pretraining: PretrainingImages | None = None  # rendered (needs `synthetic`) for the demo's stand-ins
    # rendered (needs `synthetic`) when a distillation first reads it: distill.unlabeled=<root>/images. Not part of
    # what `prepare` depends on: turning it on reruns nothing
    unlabeled_pool: PretrainingImages | None = None

    @model_validator(mode="after")
    def _pretraining_needs_synthetic(self) -> DataConfig:
        if self.pretraining is not None and self.synthetic is None:
            raise ValueError("data.pretraining renders images: it needs data.synthetic")
        return self


class TinyPretraining(Section):
    """How the tiny LLaVA is pretrained before `finetune`: the vision tower and projector on attribute labels (as CLIP
    learnt from image-text pairs), then the whole model answering a question in a style other than DeepFashion's."""

    vision_epochs: StrictInt = Field(15, ge=0)
    vision_learning_rate: Rate = 3e-3
    language_epochs: StrictInt = Field(6, ge=0)
    language_learning_rate: Rate = 2e-3
    batch_size: Positive = 16  # the language step's (32 read worse: docs/results.md); the vision step's is twice it


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
    pretrain: TinyPretraining | None = None  # a stand-in for LLaVA's own pretraining (on data.pretraining)

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
    model: Path  # base checkpoint folder: any image-text-to-text model (docs/teachers.md)
    tiny: TinyTeacher | None = None  # when set and `model` is missing, build a tiny LLaVA there
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    quantization: Literal["none", "4bit"] = "none"
    lora: LoraConfig = LoraConfig()
    train: TeacherTrain = TeacherTrain()


class VllmConfig(Section):
    """The vLLM engine (``distill.engine: vllm``; docs/engines.md). ``dtype`` changes the captions and is part of a
    dataset's fingerprint; the others only change speed and memory."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: teacher.precision
    tensor_parallel_size: Positive = 1  # GPUs per engine (a Slurm distill task gets this many)
    gpu_memory_utilization: StrictFloat = Field(0.9, gt=0.0, le=1.0)
    max_model_len: Positive | None = None  # prompt (with the image tokens) + caption; None: the model's maximum
    max_num_seqs: Positive = 256  # sequences decoded together
    cpu_kv_cache_gb: Positive = 1  # GiB of KV cache of the CPU build (VLLM_CPU_KVCACHE_SPACE)


class DistillConfig(Section):
    temperature: StrictFloat = Field(0.2, ge=0.0)
    name: Name | None = None  # dataset name; default "precise" for T<0.5, else "creative"
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)  # 1.0 = plain temperature sampling (LLaVA's own eval scripts)
    max_new_tokens: Positive = 200
    batch_size: Positive = 16  # images per generate call (vllm: per engine call, the unit appended to the JSONL)
    engine: Literal["hf", "vllm"] = "hf"  # hf: transformers generate in-process; vllm: the vLLM engine (.venv-vllm)
    vllm: VllmConfig = VllmConfig()
    # what `make demo` / `make submit` run
    temperatures: dict[Name, Annotated[StrictFloat, Field(ge=0.0)]] = {"precise": 0.2, "creative": 0.9}
    samples_per_image: Positive = 1  # k captions per train/val image; sample j seeded from (seed, image id, j)
    unlabeled: Path | None = None  # a folder of uncaptioned images the teacher captions into the train split

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.samples_per_image > 1 and self.temperature == 0:
            raise ValueError(f"distill.samples_per_image: {self.samples_per_image} samples at distill.temperature=0 "
                             "would be identical (greedy); use 1 or a temperature above 0")
        return self

    @property
    def dataset_name(self) -> str:
        if self.name:
            return self.name
        return "precise" if self.temperature < 0.5 else "creative"


class StandInTraining(Section):
    """One encoder family's own stand-in training settings (unset: the shared ones)."""

    epochs: Positive | None = None
    learning_rate: Rate | None = None
    batch_size: Positive | None = None


class EncoderStandIn(Section):
    """A stand-in for ImageNet pretraining: each (scaled) torchvision encoder is trained on attribute labels of the
    pretraining images and saved in torchvision's own file layout under ``weights_dir``."""

    epochs: Positive = 5
    images: Positive | None = 1000  # the first N pretraining images (None: all of them)
    learning_rate: Rate = 2e-3
    batch_size: Positive = 64
    # per encoder family, other values of the keys above (a plain VGG without batch norm needs a lower rate and
    # more epochs), e.g. {vgg19: {epochs: 10, learning_rate: 1.0e-3}}
    by_encoder: dict[EncoderName, StandInTraining] = {}

    def of(self, encoder: str) -> EncoderStandIn:
        """The settings of ``encoder``'s stand-in (its ``by_encoder`` entry applied; ``by_encoder`` itself dropped)."""
        override = self.by_encoder.get(encoder)
        return self.model_copy(update={**(override.model_dump(exclude_none=True) if override else {}),
                                       "by_encoder": {}})


class EncoderSettings(Section):
    pretrained: StrictBool = False  # ImageNet weights from the local torch cache or `weights_dir`
    weights_dir: Path | None = None
    finetune: StrictBool = False  # train the encoder too (then features are not cached)
    width: Rate = 1.0  # demo: scale of the small encoders of each family
    image_size: StrictInt = Field(224, ge=32, le=1024)
    stand_in: EncoderStandIn | None = None  # demo: build `weights_dir`'s weights by pretraining on data.pretraining


# a caption source of the students: gt, a distilled dataset's name, or gt+<dataset> (the ground truth plus the
# dataset's captions of its unlabelled images)
SourceName = Annotated[str, Field(pattern=r"^(gt\+)?[A-Za-z0-9][A-Za-z0-9._-]*$")]


class ScstConfig(Section):
    """Self-critical sequence training after cross-entropy (``epochs`` 0: off); see :mod:`pipeline.students.scst`."""

    epochs: StrictInt = Field(0, ge=0)
    samples: StrictInt = Field(5, ge=2)  # sampled captions per image; the baseline is the mean of the others
    attribute_weight: StrictFloat = Field(1.0, ge=0)  # lambda: reward = CIDEr-D + lambda x attribute agreement
    lr: Rate = 5e-5
    batch_size: Positive = 16  # images per step (x samples captions)


class StudentsConfig(Section):
    archs: list[Arch] = Field(default_factory=lambda: list(ARCHS), min_length=1)
    sources: list[SourceName] | None = None  # caption sources; None = gt + every distilled dataset in the run
    encoder: EncoderSettings = EncoderSettings()
    embed_dim: Positive = 512
    hidden_dim: Positive = 512
    num_layers: Positive = 1
    dropout: StrictFloat = Field(0.5, ge=0, lt=1)
    min_word_count: Positive = 5
    max_length: StrictInt = Field(100, gt=1)
    epochs: Positive = 10
    max_steps: Positive | None = None  # stop after this many optimizer steps (None: `epochs`); sweep step controls
    batch_size: Positive = 64
    # batches of captions of similar length (shuffled pools sorted by length, batches in random order): the decoders
    # run to each batch's longest caption, so random batches spend ~30% of their steps on padding
    group_by_length: StrictBool = True
    encoder_lr: Rate = 1e-5
    decoder_lr: Rate = 5e-4
    grad_clip: Rate = 5.0  # max gradient norm
    attention_reg: StrictFloat = Field(1.0, ge=0)  # doubly-stochastic attention regulariser weight
    beam_size: Positive = 5
    val_every_epochs: Positive = 1
    val_every_steps: Positive | None = None  # validate every N optimizer steps instead of epochs
    val_beam_size: Positive = 1
    # validation metric that picks best/ and counts for early stopping (ties: the other one): attribute accuracy
    # (does the caption state this image's outfit?) or CIDEr-D
    select_on: Literal["attributes", "CIDEr-D"] = "attributes"
    early_stop_patience: Positive = 3  # stop after this many validations without a better one
    transformer_layers: Positive = 3
    transformer_heads: Positive = 8
    num_workers: StrictInt = Field(0, ge=0)  # image-decoding workers (feature cache; the encoder-in-the-loop batches)
    # n-gram blocking in greedy and beam search (0: off): no n-gram appears twice in a caption
    no_repeat_ngram: StrictInt = Field(0, ge=0)
    scst: ScstConfig = ScstConfig()
    # one model per seed for each (architecture, source); None: the run's seed. The first seed keeps the folder
    # students/<arch>__<source>/, the others are <arch>__<source>__s<seed>/
    seeds: list[StrictInt] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> StudentsConfig:
        if self.hidden_dim % self.transformer_heads:
            raise ValueError(f"students.hidden_dim: {self.hidden_dim} is not divisible by students.transformer_heads="
                             f"{self.transformer_heads}")
        if len(set(self.archs)) != len(self.archs):
            raise ValueError(f"students.archs: {self.archs} lists an architecture twice")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"students.seeds: {self.seeds} lists a seed twice")
        if any(ARCHS[a].encoder == "vit_b_16" for a in self.archs) and self.encoder.image_size % 16:
            raise ValueError(f"students.encoder.image_size: {self.encoder.image_size} is not a multiple of 16 "
                             "(the ViT's patch size)")
        return self


class SweepConfig(Section):
    """`make sweep`: distil at each temperature, train one student on each, pick the temperature on validation."""

    temperatures: list[Annotated[StrictFloat, Field(ge=0.0)]] = Field([0.0, 0.2, 0.5, 0.7, 0.9, 1.2], min_length=1)
    student: Arch = "resnet101_gru"
    samples_per_image: list[Positive] = Field([1], min_length=1)  # k > 1 runs at the best temperature
    unlabeled: Path | None = None  # a folder of uncaptioned images: gt + their teacher captions vs gt alone, best T
    select_on: Literal["attributes", "CIDEr-D"] = "attributes"  # validation metric picking T; ties: the other one

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        for key in ("temperatures", "samples_per_image"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"sweep.{key}: {values} lists a value twice")
        return self


class CaptionConfig(Section):
    """`make caption`: captioning a user's own images with a student (or the teacher)."""

    batch_size: int = Field(32, gt=0)
    max_pixels: int = Field(40_000_000, gt=0)  # larger images are skipped, not decoded (PIL refuses > ~179M anyway)


class ReportConfig(Section):
    gallery_size: Positive = 12


class SlurmResources(Section):
    """One job kind's (cpu, gpu, finetune) or one job's (prepare, students-gt, ...) Slurm request; unset: the
    defaults of its kind (pipeline.orchestration.slurm.resources)."""

    partition: str | None = None
    gpus: StrictInt | None = Field(None, ge=0)  # per node
    cpus: Positive | None = None
    mem: str | None = None
    time: str | None = None


class SlurmConfig(Section):
    partition: str | None = None
    cpu_partition: str | None = None  # CPU-only jobs (prepare, reset, merge, speed, report); unset: `partition`
    account: str | None = None
    time: dict[str, str] = {"default": "04:00:00"}
    gpus_per_node: StrictInt = Field(1, ge=0)
    nodes: dict[str, Positive] = {"finetune": 1}
    cpus_per_task: Positive = 2  # per GPU (finetune asks for this many per GPU rank); CPU-only jobs too
    mem: str | None = None  # GPU jobs; CPU-only jobs ask for `cpu_mem`
    cpu_mem: str | None = "16G"
    resources: dict[str, SlurmResources] = {}  # by kind (cpu, gpu, finetune) or job name; the job's entry wins
    requeue: StrictBool = True  # a preempted or timed-out job is requeued and resumes from its checkpoints
    signal_seconds: StrictInt = Field(300, ge=0)  # USR1 this long before the time limit: requeue (0: no signal)
    array_throttle: StrictInt = Field(0, ge=0)  # at most this many tasks of an array at once (0: no limit)
    distill_shards: Positive = 1
    sweep: StrictBool = False  # `make submit` also runs the temperature sweep (sweep.*) as job arrays
    setup: list[str] = ["source .venv/bin/activate"]  # shell lines before each job (cwd: the project root)
    extra_args: list[str] = []


class PlanConfig(Section):
    """What `make plan` assumes beyond the teacher's config.json and the run's settings (docs/plan.md)."""

    gpu: str = "H100"  # a row of pipeline.teacher.plan.GPUS: H100, H200, A100 (80 GB), A100-40, L40S, A10G
    gpus: Positive | None = None  # data-parallel GPUs of the fine-tune; None: slurm.gpus_per_node x nodes.finetune
    utilization: StrictFloat = Field(0.4, gt=0, le=1)  # share of the GPU's dense bf16 peak the matmuls reach
    overhead_gib: StrictFloat = Field(1.0, ge=0)  # CUDA context, cuBLAS workspace, NCCL buffers per GPU
    text_tokens: Positive = 100  # prompt text + caption + end token (the image's tokens come on top)
    image_tokens: Positive | None = None  # image tokens a sample (dynamic-resolution families); None: from config.json
    train_samples: Positive = 33072  # DeepFashion-MultiModal's 44,096 images at the course project's split
    distill_images: Positive = 44096  # images a distilled dataset captions (train, val and test)


class Config(Section):
    run_dir: Path
    seed: StrictInt = Field(0, ge=0, le=2**32 - 1)  # numpy's seeding takes 32 bits
    data: DataConfig
    teacher: TeacherConfig
    distill: DistillConfig = DistillConfig()
    students: StudentsConfig = StudentsConfig()
    report: ReportConfig = ReportConfig()
    caption: CaptionConfig = CaptionConfig()
    slurm: SlurmConfig = SlurmConfig()
    sweep: SweepConfig = SweepConfig()
    plan: PlanConfig = PlanConfig()

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.teacher.train.bf16 and self.teacher.train.fp16:
            raise ValueError("teacher.train.bf16 and teacher.train.fp16 are both true; choose one")
        for key, path in (("data.root", self.data.root), ("teacher.model", self.teacher.model),
                          ("distill.unlabeled", self.distill.unlabeled)):
            for output in () if path is None else RunDir(self.run_dir).output_folders():
                if Path(os.path.abspath(path)).is_relative_to(os.path.abspath(output)):
                    raise ValueError(f"{key}: {path} is inside {output}, an output folder the pipeline replaces; "
                                     "put it elsewhere")
        stand_ins = {"teacher.tiny.pretrain": self.teacher.tiny and self.teacher.tiny.pretrain,
                     "students.encoder.stand_in": self.students.encoder.stand_in}
        for key, wanted in stand_ins.items():
            if wanted and self.data.pretraining is None:
                raise ValueError(f"{key} trains on the pretraining images: set data.pretraining")
        if self.students.encoder.stand_in and not (self.students.encoder.pretrained
                                                   and self.students.encoder.weights_dir):
            raise ValueError("students.encoder.stand_in writes the weights it loads: it needs "
                             "students.encoder.pretrained=true and students.encoder.weights_dir")
        taken = [n for n in self.distill.temperatures if n.startswith(SWEEP_PREFIX)]
        if taken:
            raise ValueError(f"distill.temperatures: {taken[0]!r}: names starting with {SWEEP_PREFIX!r} are the "
                             "temperature sweep's (make sweep); choose another name")
        return self


Origins = dict[tuple[str, ...], str]  # key path -> the file (or "override") that set it


class _NoAliasLoader(yaml.SafeLoader):
    """The safe loader without aliases (``*name``): a few lines of them expand to billions of nodes (a "billion
    laughs" bomb) before anything is validated; a config never needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"aliases (*{event.anchor}) are not allowed in a config; "
                                              "write the value out", event.start_mark)
        return super().compose_node(parent, index)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_NoAliasLoader)


def _yaml_error(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: where, then what."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {context + ': ' if context else ''}{problem}"


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
        if e["type"] == "value_error":  # a cross-field check: its message starts with the key, blamed where set
            message = str(e["ctx"]["error"])
            key = re.match(r"([a-z_0-9]+(?:\.[a-z_0-9]+)+): ", message)
            loc = tuple(key.group(1).split(".")) if key else e["loc"]
            lines.append(f"{_source(origins, loc, default)}: {message}")
            continue
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
        value = _yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {_yaml_error(exc)}") from None
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
        tree = _yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_error(exc)}") from None
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
