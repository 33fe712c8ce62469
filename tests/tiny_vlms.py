"""Tiny image-text-to-text checkpoints of nine families, built locally (random weights, a BPE tokenizer trained on
the given texts, each family's processor and a chat template like its real checkpoints'), and one of a shape the
pipeline was not written against (:func:`build_foreign`).

``build(family, out_dir, texts)`` saves model + processor with ``save_pretrained``: a folder that loads through
``AutoModelForImageTextToText`` / ``AutoProcessor`` as a downloaded checkpoint does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

EXTRA_TEXT = ["USER: ASSISTANT: system user assistant You are a helpful assistant. User: Assistant: [INST] [/INST]"]

LLAVA_TEMPLATE = (  # llava-hf/llava-1.5-*-hf
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_NEXT_TEMPLATE = (  # llava-hf/llava-v1.6-mistral-7b-hf
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] + "
    "'\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] "
    "== 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}{% endif %}{% endfor %}"
)
QWEN2_VL_TEMPLATE = (  # Qwen/Qwen2-VL-*-Instruct
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a "
    "helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% for content in message['content'] "
    "%}{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
IDEFICS3_TEMPLATE = (  # HuggingFaceTB/SmolVLM-Instruct (writes its BOS <|im_start|> itself)
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
ONEVISION_TEMPLATE = (  # llava-hf/llava-onevision-qwen2-*-ov-hf: its assistant turn starts "<|im_start|>assistant \n",
    # not with its own generation prompt "<|im_start|>assistant\n"
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA3_TEMPLATE = (  # google/gemma-3-*-it without its system-turn folding
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] %}<start_of_turn>{{ role }}\n{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PALIGEMMA_TEMPLATE = (  # made up: PaliGemma's checkpoints have none (without one the pipeline refuses them)
    "{% for message in messages %}{% if message['role'] == 'user' %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n"
    "{% else %}{{ message['content'][0]['text'] }}<eos>{% endif %}{% endfor %}"
)
FOREIGN_TEMPLATE = (  # a Gemma-like turn format none of the others uses, with a system line
    "<bos>{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else "
    "message['role'] }}\n{% if message['role'] == 'user' %}Look closely.\n{% endif %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image><image_soft_token><end_of_image>\n{% else %}{{ c['text'] | trim }}"
    "{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def train_tokenizer(texts: Sequence[str], specials: list[str], *, bos: str | None, eos: str, pad: str,
                    unk: str | None, extra: dict[str, str], vocab_size: int = 400, model: str = "bpe"):
    """A tokenizer trained on ``texts``: byte-level BPE (``model="bpe"``) or a Unigram one with a Metaspace
    pre-tokenizer (``"unigram"``); ``bos`` prepended when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if model == "bpe":
        tok = Tokenizer(models.BPE(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=unk,
                                          show_progress=False)
    tok.train_from_iterator([*texts, *EXTRA_TEXT], trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
                                   extra_special_tokens=extra, padding_side="right", model_max_length=4096)


def _llama(tok, layers: int = 2, hidden: int = 64, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       **kw)


def _clip(image_size: int, patch_size: int, hidden: int = 32):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, image_size=image_size, patch_size=patch_size, projection_dim=hidden)


LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def build_llava(texts):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = train_tokenizer(texts, LLAMA_SPECIALS, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                          extra={"image_token": "<image>"})
    size, patch = 28, 7
    config = LlavaConfig(vision_config=_clip(size, patch), text_config=_llama(tok),
                         image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=(size // patch) ** 2,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    ip = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaForConditionalGeneration(config), LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)


def build_llava_next(texts):
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = train_tokenizer(texts, LLAMA_SPECIALS, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                          extra={"image_token": "<image>"})
    size, patch, pinpoints = 28, 7, [[28, 56], [56, 28], [56, 56]]
    config = LlavaNextConfig(vision_config=_clip(size, patch), text_config=_llama(tok),
                             image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                             image_seq_length=(size // patch) ** 2, vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
    ip = LlavaNextImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 image_grid_pinpoints=pinpoints)
    return LlavaNextForConditionalGeneration(config), LlavaNextProcessor(
        image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_NEXT_TEMPLATE)


def _qwen_tokenizer(texts):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
    return train_tokenizer(texts, specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None,
                           extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})


def _qwen_vl(model_cls, config_cls, processor_cls, texts, vision: dict):
    """A Qwen2-VL-style model (M-RoPE text, patch-merging vision, 56-112 px images) and its processor."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tok = _qwen_tokenizer(texts)
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                        vision_end_token_id=ids("<|vision_end|>"))
    pixels = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}  # min_pixels / max_pixels
    kw = dict(size=pixels, patch_size=14, merge_size=2, temporal_patch_size=2)
    return model_cls(config), processor_cls(
        image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tok, video_processor=Qwen2VLVideoProcessor(**kw),
        chat_template=QWEN2_VL_TEMPLATE)


def build_qwen2_vl(texts):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return _qwen_vl(Qwen2VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLProcessor, texts, vision)


def build_qwen2_5_vl(texts):
    """Qwen2.5-VL (the modern-teacher config's family): a windowed-attention vision tower with an MLP merger."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, out_hidden_size=64, fullatt_block_indexes=[1])
    return _qwen_vl(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig, Qwen2_5_VLProcessor, texts, vision)


def _idefics3_like(texts, model_cls, config_cls, vision_cls, processor_cls, image_processor_cls, **processors):
    """An Idefics3-style model (pixel-shuffle connector, image split into 32 px tiles + a global one) and its
    processor; ``processors``: further processor parts, each given the image sizes."""
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = train_tokenizer(texts, specials, bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>",
                          unk="<|endoftext|>", extra={"image_token": "<image>"})
    size, patch, scale = 32, 8, 2
    vision = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=size, patch_size=patch)
    config = config_cls(vision_config=vision, text_config=_llama(tok), scale_factor=scale,
                        image_token_id=tok.convert_tokens_to_ids("<image>"))
    sizes = dict(size={"longest_edge": 2 * size}, max_image_size={"longest_edge": size})
    return model_cls(config), processor_cls(
        image_processor=image_processor_cls(**sizes, do_image_splitting=True), tokenizer=tok,
        image_seq_len=(size // patch) ** 2 // scale**2, chat_template=IDEFICS3_TEMPLATE,
        **{k: cls(**sizes) for k, cls in processors.items()})


def build_idefics3(texts):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    return _idefics3_like(texts, Idefics3ForConditionalGeneration, Idefics3Config, Idefics3VisionConfig,
                          Idefics3Processor, Idefics3ImageProcessor)


def build_smolvlm(texts):
    """SmolVLM (Idefics3's successor; its processor needs the package num2words)."""
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    return _idefics3_like(texts, SmolVLMForConditionalGeneration, SmolVLMConfig, SmolVLMVisionConfig,
                          SmolVLMProcessor, SmolVLMImageProcessor, video_processor=SmolVLMVideoProcessor)


def _siglip(image_size: int, patch_size: int, hidden: int = 32):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                              vision_use_head=False)


def build_llava_onevision(texts):
    """SigLIP tower, Qwen2 language model, anyres tiles (the image tokens depend on the image's size)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tok = train_tokenizer(texts, specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None,
                          extra={"image_token": "<image>", "video_token": "<video>"})
    ids = tok.convert_tokens_to_ids
    size, patch, pinpoints = 32, 8, [[32, 64], [64, 32], [64, 64]]
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaOnevisionConfig(vision_config=_siglip(size, patch), text_config=text,
                                  image_token_index=ids("<image>"), video_token_index=ids("<video>"),
                                  image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full",
                                  vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    square = {"height": size, "width": size}
    return LlavaOnevisionForConditionalGeneration(config), LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=square, image_grid_pinpoints=pinpoints), tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(size=square), num_image_tokens=(size // patch) ** 2,
        vision_feature_select_strategy="full", chat_template=ONEVISION_TEMPLATE)


def build_gemma3(texts):
    """Gemma 3: the processor's ``image_token_id`` is its begin-of-image marker, each image becomes 4 soft tokens
    (a pooled 4x4 patch grid), images go to the processor one list per prompt, ``<end_of_turn>`` ends an answer."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"]
    tok = train_tokenizer(texts, specials, bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>",
                          extra={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                 "eoi_token": "<end_of_image>"})
    ids = tok.convert_tokens_to_ids
    text = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                            sliding_window=64, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    size, patch, soft = 32, 8, 4
    config = Gemma3Config(text_config=text, vision_config=_siglip(size, patch), mm_tokens_per_image=soft,
                          boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                          image_token_index=ids("<image_soft_token>"))
    ip = Gemma3ImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Gemma3ForConditionalGeneration(config), Gemma3Processor(image_processor=ip, tokenizer=tok,
                                                                   image_seq_length=soft, chat_template=GEMMA3_TEMPLATE)


def build_paligemma(texts):
    """PaliGemma: a prefix LM (the prompt's tokens, typed 0, see each other both ways; the answer's must be typed 1)
    whose processor returns ``labels`` and ``token_type_ids`` of its own; embeddings untied, so that the random model
    does not just repeat the prompt's last (special) token."""
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    tok = train_tokenizer(texts, ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], bos="<bos>", eos="<eos>",
                          pad="<pad>", unk="<unk>", extra={"image_token": "<image>"})
    size, patch = 32, 8
    ip = SiglipImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ip.image_seq_length = (size // patch) ** 2
    processor = PaliGemmaProcessor(image_processor=ip, tokenizer=tok, chat_template=PALIGEMMA_TEMPLATE)
    tok = processor.tokenizer  # the processor adds its <loc>/<seg> tokens
    text = GemmaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = PaliGemmaConfig(vision_config=_siglip(size, patch), text_config=text, projection_dim=64, hidden_size=64,
                             image_token_index=tok.convert_tokens_to_ids("<image>"), vocab_size=len(tok),
                             tie_word_embeddings=False)
    return PaliGemmaForConditionalGeneration(config), processor


def build_foreign(texts):
    """A LLaVA-architecture checkpoint unlike the others: a Unigram tokenizer whose template writes its own BOS,
    two end tokens (the generation config lists both), 40 px images in 10 px patches, three 96-wide text layers, a
    vision tower 24 wide, and a Gemma-like turn format with a fixed line before the image."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"]
    tok = train_tokenizer(texts, specials, bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>",
                          extra={"image_token": "<image_soft_token>"}, vocab_size=800, model="unigram")
    size, patch = 40, 10
    text = _llama(tok, layers=3, hidden=96)
    config = LlavaConfig(vision_config=_clip(size, patch, hidden=24), text_config=text,
                         image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
                         image_seq_length=(size // patch) ** 2, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    ip = CLIPImageProcessor(size={"height": size, "width": size}, do_center_crop=False, image_mean=[0.5] * 3,
                            image_std=[0.5] * 3)
    model = LlavaForConditionalGeneration(config)
    return model, LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                 chat_template=FOREIGN_TEMPLATE)


BUILDERS = {"llava": build_llava, "llava_next": build_llava_next, "qwen2_vl": build_qwen2_vl,
            "qwen2_5_vl": build_qwen2_5_vl, "smolvlm": build_smolvlm,
            "idefics3": build_idefics3, "foreign": build_foreign, "llava_onevision": build_llava_onevision,
            "gemma3": build_gemma3, "paligemma": build_paligemma}
FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "llava_onevision", "gemma3")


def with_32_wide_heads(model):
    """A model of the same family with 32-wide attention heads in both towers, new random weights (vLLM's CPU build
    has no attention kernel for the 16-wide heads of the builders above)."""
    config = model.config
    text, vision = config.text_config, config.vision_config
    text.hidden_size, text.num_attention_heads, text.num_key_value_heads = 128, 4, 2
    if getattr(text, "head_dim", None):
        text.head_dim = 32
    rope = getattr(text, "rope_parameters", None) or {}
    if "mrope_section" in rope:
        rope["mrope_section"] = [4, 6, 6]  # Qwen's M-RoPE sections add up to half a head
    if hasattr(vision, "embed_dim"):  # Qwen2-VL's tower
        vision.embed_dim, vision.num_heads, vision.hidden_size = 64, 2, 128
    elif hasattr(vision, "out_hidden_size"):  # Qwen2.5-VL's
        vision.hidden_size, vision.num_heads, vision.intermediate_size, vision.out_hidden_size = 64, 2, 128, 128
    else:  # CLIP, SigLIP, Idefics3
        vision.hidden_size, vision.num_attention_heads, vision.intermediate_size = 64, 2, 128
    return type(model)(config)


def build(family: str, out_dir: Path, texts: Sequence[str], seed: int = 0, wide_heads: bool = False) -> Path:
    """Build the tiny ``family`` checkpoint (tokenizer trained on ``texts``; 32-wide attention heads with
    ``wide_heads``) and save it to ``out_dir``."""
    torch.manual_seed(seed)
    model, processor = BUILDERS[family](list(texts))
    if wide_heads:
        model = with_32_wide_heads(model)
    tok = processor.tokenizer
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id = tok.pad_token_id, tok.bos_token_id
    gc.eos_token_id = tok.eos_token_id
    if family in ("foreign", "gemma3"):  # the turn's end token ends an answer too (Gemma 3's <end_of_turn>)
        gc.eos_token_id = [tok.convert_tokens_to_ids("<end_of_turn>"), tok.eos_token_id]
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)
