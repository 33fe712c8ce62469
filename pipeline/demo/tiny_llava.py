"""Build a tiny LLaVA (small Llama + small CLIP vision tower) saved in llava-hf layout, with no hub access.

The tokenizer is a byte-level BPE trained here on the training captions; the processor pairs it with a CLIP image
processor and llava-1.5-hf's chat template, so the demo and the tests load this checkpoint through exactly the code
path a downloaded ``llava-1.5-13b-hf`` takes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from pipeline.core.config import TinyTeacher
from pipeline.core.rundir import atomic_write_json, publish_dir

log = logging.getLogger(__name__)

# llava-1.5-hf's own chat template ("USER: <image>\n... ASSISTANT:"), with the answer marked for generation.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer (Llama-style specials, BOS prepended) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="right", model_max_length=4096)


RECORD = "tiny_llava.json"  # what a tiny LLaVA folder was built from, and its pretraining figures


def tiny_settings(cfg: TinyTeacher, seed: int, pretraining_root: Path | None, texts: list[str]) -> dict:
    """What the tiny LLaVA depends on: its shape, pretraining settings, seed, pretraining images and the texts its
    tokenizer learns from."""
    images = None
    if cfg.pretrain is not None and pretraining_root is not None:
        images = json.loads((Path(pretraining_root) / "README.json").read_text())
    recipe = None
    if cfg.pretrain is not None:
        from pipeline.demo.tiny_pretrain import RECIPE

        recipe = RECIPE
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    return {"tiny": cfg.model_dump(mode="json"), "seed": seed, "pretraining_images": images, "recipe": recipe,
            "tokenizer_texts": digest}


def built_with(path: Path, settings: dict) -> bool:
    """Whether ``path`` holds a tiny LLaVA built with these settings."""
    record = path / RECORD
    return (path / "config.json").is_file() and record.is_file() and \
        json.loads(record.read_text()).get("settings") == settings


def is_current(path: Path, settings: dict) -> bool:
    """A model folder to use as it is: one built here with these settings, or any checkpoint not built here."""
    if not (path / "config.json").is_file():
        return False
    return not (path / RECORD).is_file() or built_with(path, settings)


def read_pretraining_images(root: Path) -> tuple[list, list[str]]:
    """The images and captions of a held-out set written by ``pipeline.demo.synthetic.generate_held_out``."""
    from pipeline.data.images import load_rgb

    captions = json.loads((Path(root) / "captions.json").read_text())
    names = sorted(captions)
    return [load_rgb(Path(root) / "images" / n) for n in names], [captions[n] for n in names]


def build_tiny_llava(out_dir: str | Path, cfg: TinyTeacher, texts: list[str], seed: int = 0,
                     pretraining_root: Path | None = None) -> Path:
    """Write a tiny LlavaForConditionalGeneration + processor to ``out_dir`` (atomically): randomly initialised, then
    pretrained on the images at ``pretraining_root`` when ``cfg.pretrain`` is set (see pipeline.demo.tiny_pretrain)."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    settings = tiny_settings(cfg, seed, pretraining_root, texts)
    pretraining = None
    if cfg.pretrain is not None:
        from pipeline.demo.tiny_pretrain import QUESTION, attribute_list

        pretraining = read_pretraining_images(pretraining_root)
        texts = [*texts, *pretraining[1], *map(attribute_list, pretraining[1]), QUESTION]
    tokenizer = train_tokenizer(texts)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text_config = LlamaConfig(
        vocab_size=len(tokenizer) + cfg.vocab_extra, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden_size, intermediate_size=cfg.vision_hidden_size * 4,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads, image_size=cfg.image_size,
        patch_size=cfg.patch_size, projection_dim=cfg.vision_hidden_size,
    )
    num_image_tokens = (cfg.image_size // cfg.patch_size) ** 2  # "default" strategy drops CLS
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
                         image_seq_length=num_image_tokens, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    image_processor = CLIPImageProcessor(size={"shortest_edge": cfg.image_size},
                                         crop_size={"height": cfg.image_size, "width": cfg.image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    figures = None
    if pretraining is not None:
        from pipeline.demo.tiny_pretrain import pretrain_tiny_llava

        figures = pretrain_tiny_llava(model, processor, *pretraining, cfg.pretrain, seed)
    with publish_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / RECORD, {"settings": settings, "pretraining": figures})
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built tiny LLaVA (%.2fM parameters, %d image tokens, vocab %d) in %s", n_params / 1e6,
             num_image_tokens, len(tokenizer), out_dir)
    return Path(out_dir)
