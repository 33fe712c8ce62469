"""The plan (pipeline/teacher/plan.py) against a hand count on a toy LLaVA config (every expected number worked out in
the comments), and `make plan` on a config."""

import json

import pytest

from pipeline.teacher import plan

TOY = {
    "model_type": "llava", "image_seq_length": 4, "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
    "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
}
# text: h=64 i=128 L=2 a=4 kv=2 -> head dim d = 64/4 = 16
#   q 64*64=4096, k 64*(2*16)=2048, v 2048, o 4096, gate/up/down 64*128=8192 each -> 36864 matmul params per layer
#   + 2 RMSNorms 2*64=128 -> 36992 per layer; x2 layers = 73984
#   embed 100*64=6400 + lm_head 6400 (untied) + final norm 64 = 12864 -> text 86848
TEXT = 86848
# vision (CLIP): per layer q,k,v,o 4*(32*32+32)=4224, fc1 32*64+64=2112, fc2 64*32+32=2080, 2 LayerNorms 4*32=128
#   -> 8544; x2 = 17088. Embeddings: patch conv 3*14*14*32=18816 (no bias), 28/14=2 -> 4 patches + CLS = 5
#   positions 5*32=160, class embedding 32, pre_layrnorm 64, post_layernorm 64 -> 19136 -> vision 36224
VISION = 36224
# projector: linear_1 32*64+64=2112, linear_2 64*64+64=4160 -> 6272
PROJ = 6272
TOTAL = TEXT + VISION + PROJ  # 129344
# LoRA r=4, all 7 linears, per layer: q 4*(64+64)=512, k 4*(64+32)=384, v 384, o 512, gate/up/down 4*(64+128)=768
#   each -> 512+384+384+512+3*768 = 4096; x2 layers = 8192. Trainable P = 8192 + 6272 (projector copy) = 14464
LORA, P = 8192, 14464


def toy(**kw):
    s = plan.Settings(r=4, batch=2, text_tokens=6, gpus=2, overhead_gib=0.0, **kw)
    return plan.arch_from_config(TOY), s


def test_params():
    arch, s = toy()
    assert arch.text.params() == TEXT
    assert arch.vision.params() == VISION
    assert arch.projector == PROJ
    assert arch.total == TOTAL == 129344
    assert arch.image_tokens == 4
    assert plan.lora_params(arch.text, s) == LORA


def test_zero2_memory():
    arch, s = toy(zero=2)
    r = plan.plan(arch, s)
    rows = {n: b for n, b, _ in r["rows"]}
    assert r["seq"] == 10  # 4 image + 6 text tokens
    assert rows["frozen weights"] == 2 * TOTAL == 258688  # ZeRO-2: full copy
    assert rows["trainable params"] == 2 * P == 28928
    assert rows["gradients (partition)"] == 2 * P / 2 == 14464
    assert rows["fp32 master + Adam m, v"] == 12 * P / 2 == 86784
    # reduce bucket auto = h*h = 4096 elements: 2 buffers * 2 bytes * 4096 = 16384; allgather 2*min(2e8, P) = 28928
    assert rows["ZeRO buffers"] == 16384 + 28928
    assert r["static"] == 258688 + 28928 + 14464 + 86784 + 45312 == 434176
    # activations, b=2 s=10 -> sb=20, sbh=1280. One layer, no recompute:
    #   norms 8*sbh = 10240; SDPA q,k,v,out 4*2*sb*(a*d=64) = 10240; SwiGLU 6*sb*i = 6*20*128 = 15360
    #   LoRA dropout 3*sb*(6*64 + 128) = 60*512 = 30720; LoRA A outputs 2*sb*r*7 = 2*20*4*7 = 1120 -> 67680
    assert r["per_layer"]["detailed"] == 67680
    assert r["per_layer"]["korthikanti"] == 34 * 1280
    # with checkpointing: L*2sbh = 5120, embeds+final norm 6sbh = 7680, projector b*n_img*(2*32+4*64) = 2*4*320 = 2560
    #   max(logits 14*sb*V = 14*20*100 = 28000, layer 67680 + 4sbh 5120 = 72800) = 72800 -> 88160
    rows = {n: b for n, b, _ in r["rows"]}
    assert rows["activations (LM fwd/bwd peak)"] == 5120 + 7680 + 2560 + 72800 == 88160
    # vision fwd transient: n = b*5 = 10 tokens: 2*10*32*(2+1) = 1920 + 2*10*(4*32+64) = 3840 -> 5760 (< 88160)
    assert rows["  (vision fwd transient, not added)"] == 5760
    assert r["peak"] == 434176 + 88160 == 522336


def test_zero3_shards_weights():
    arch, s = toy(zero=3)
    r = plan.plan(arch, s)
    rows = {n: b for n, b, _ in r["rows"]}
    assert rows["frozen weights"] == 2 * TOTAL / 2 == 129344
    assert rows["trainable params"] == 2 * P / 2 == 14464
    # largest unit: max(layer 36992, V*h 6400) -> 2 * 2 * 36992
    assert rows["ZeRO buffers"] == 4 * 36992


def test_no_checkpointing():
    arch, s = toy(grad_ckpt=False)
    r = plan.plan(arch, s)
    rows = {n: b for n, b, _ in r["rows"]}
    # L*layer 2*67680 = 135360 + embeds 7680 + projector 2560 + logits 28000 = 173600
    assert rows["activations (LM fwd/bwd peak)"] == 173600


def test_dropout_zero_shares_inputs():
    arch, s = toy(lora_dropout=0.0)
    r = plan.plan(arch, s)
    # base 35840 + shared inputs 2*sb*(h + h + h + i) = 40*(64*3+128) = 12800 + LoRA A outputs 1120 -> 49760
    assert r["per_layer"]["detailed"] == 49760


def test_flops_and_kv():
    arch, s = toy()
    r = plan.plan(arch, s)
    # N_mm = 2*36864 + V*h 6400 = 80128; hidden-only 73728; s = 10
    # text: fwd 2*80128*10 + bwd (activation grads only) 2*80128*10 + recompute 2*73728*10 = 4679680
    # attention: per layer fwd 4*s^2*h*0.5 = 12800, x2 layers = 25600, x(1 fwd + 2 bwd + 1 recompute) = 102400
    # LoRA (6 + 2 recompute)*8192*10 = 655360; projector 6*6272*4 = 150528
    # vision fwd: 2 * (2 layers * (4*32^2 + 2*32*64) = 16384) * 5 tokens = 163840 + attention 2*4*25*32 = 6400
    assert r["flops_parts"] == {"text": 4679680, "attn": 102400, "lora": 655360, "proj": 150528, "vision": 170240}
    assert r["flops_sample"] == 5758208
    # KV per token: 2 (K,V) * L 2 * kv 2 * d 16 * 2 bytes = 256; max_model_len default = 4 image + 20 + 200 new = 224
    # 32 seqs -> 256*224*32 = 1835008
    d = {n: b for n, b, _ in r["d_rows"]}
    assert r["mml"] == 224
    assert d["KV cache"] == 256 * 224 * 32 == 1835008


def test_llava_13b_known_size():
    arch = plan.arch_from_config(plan.LLAVA_15_13B)
    assert arch.total == 13_351_494_656  # llava-1.5-13b-hf: 13.35B (26.7 GB of bf16/fp16 safetensors)
    assert plan.lora_params(arch.text, plan.Settings()) == 250_347_520  # 40 * 64 * (4*10240 + 3*18944)


def test_other_families_parse():
    qwen2vl_2b = {"model_type": "qwen2_vl", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                  "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                  "tie_word_embeddings": True,
                  "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4,
                                    "num_heads": 16, "patch_size": 14, "spatial_merge_size": 2,
                                    "temporal_patch_size": 2}}
    a = plan.arch_from_config(qwen2vl_2b)
    assert 2.1e9 < a.total < 2.3e9  # Qwen2-VL-2B-Instruct: 2.21B
    assert a.image_tokens == 144  # 336x336: 24*24 patches / 4
    idefics3_8b = {"model_type": "idefics3", "scale_factor": 2,
                   "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                   "vocab_size": 128259},
                   "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                     "num_attention_heads": 16, "image_size": 364, "patch_size": 14}}
    a = plan.arch_from_config(idefics3_8b)
    assert 8.3e9 < a.total < 8.6e9  # Idefics3-8B-Llama3: 8.46B
    assert a.image_tokens == 169  # (364/14)^2 / 2^2 per tile


def test_zero3_keeps_live_parameters_gathered():
    arch, s = toy(zero=3, max_live=100_000)
    rows = {n: b for n, b, _ in plan.plan(arch, s)["rows"]}
    assert rows["ZeRO-3 live parameters"] == 2 * 100_000  # min(stage3_max_live_parameters, N) in bf16
    arch, s = toy(zero=3)
    rows = {n: b for n, b, _ in plan.plan(arch, s)["rows"]}
    assert rows["ZeRO-3 live parameters"] == 2 * TOTAL  # the whole toy model is under the default 1e9


def test_make_plan_reads_the_config(tmp_path, make_config, capsys):
    import json

    from stages import plan as plan_stage

    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "config.json").write_text(json.dumps(TOY))
    path = make_config(teacher={"model": str(tmp_path / "toy"), "tiny": None, "lora": {"r": 4, "dropout": 0.05},
                                "train": {"per_device_batch_size": 2, "gradient_checkpointing": True}},
                       plan={"gpus": 2, "text_tokens": 6, "overhead_gib": 0.0, "gpu": "A100-40"})
    assert plan_stage.stage_main("plan", plan_stage.run, plan_stage.add_args,
                                 ["--config", str(path), "--json", str(tmp_path / "plan.json")], False) == 0
    figures = json.loads((tmp_path / "plan.json").read_text())
    assert figures["seq"] == 10 and figures["gpu_memory_gib"] == 40 and figures["parameters"] == TOTAL
    # the hand-counted ZeRO-2 peak above (the demo config's LoRA targets all 7 linears, the projector trained)
    assert figures["zero2_ckpt_peak_gib"] == round(522336 / plan.GIB, 2)
    out = capsys.readouterr().out
    assert "ZeRO-2" in out and "PEAK, without checkpointing" in out and "DISTILL" in out
    (tmp_path / "toy" / "config.json").unlink()
    assert plan_stage.stage_main("plan", plan_stage.run, plan_stage.add_args, ["--config", str(path)], False) == 1
    assert "config.json does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("family", ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3", "foreign"))
def test_parameters_are_those_of_the_built_model(tmp_path, family):
    from pipeline.teacher.collator import PromptLengths
    from pipeline.teacher.loading import load_base_model, load_processor
    from tests import tiny_vlms

    folder = tiny_vlms.build(family, tmp_path / family, ["the lady wears a long denim skirt"] * 8)
    arch = plan.arch_from_config(json.loads((folder / "config.json").read_text()))
    assert arch.total == sum(p.numel() for p in load_base_model(folder, "fp32").parameters())
    if family in ("llava", "gemma3", "foreign"):  # a fixed number of image tokens (Gemma 3: the pooled soft tokens)
        lengths = PromptLengths(load_processor(folder))
        lengths((64, 40))
        assert arch.image_tokens == lengths.image_tokens[(64, 40)]


def test_a_family_the_plan_does_not_model_is_approximated_and_says_so():
    cfg = {**TOY, "model_type": "llava_onevision"}
    assert any("approximate" in n and "plan.image_tokens" in n for n in plan.arch_from_config(cfg).notes)
    with pytest.raises(plan.PipelineError, match="mistral3"):
        plan.arch_from_config({**TOY, "model_type": "mistral3", "vision_config": {"model_type": "pixtral"}})
