"""Per-GPU memory and wall-time plan of the teacher's LoRA fine-tune (HF Trainer + DeepSpeed ZeRO-2/3) and of its
batched generation (distill), from the checkpoint's config.json alone (no weights; pure Python, no torch): `make plan`.

Understands LLaVA-1.5 (llava), LLaVA-NeXT (llava_next), Qwen2-VL / Qwen2.5-VL, Idefics3, and falls back to a generic
text_config + vision_config reading. Every number is printed with the formula that produced it. Conventions:
b = per-device batch, s = sequence length (image tokens + text tokens), h = text hidden, i = text intermediate,
L = text layers, a = heads, kv = key/value heads, d = head dim, V = vocab, r = LoRA rank, G = GPUs (data parallel).

Memory (bytes, per GPU):
  frozen weights        2 * N_base                      (ZeRO-3: / G; ZeRO-2 keeps a full copy on every GPU)
  trainable params      2 * P  (bf16 working copy; DeepSpeed casts the module to bf16)   (ZeRO-3: / G)
  gradients             2 * P / G  (ZeRO-2/3 keep only their reduced partition)
  fp32 master + Adam    (4 + 4 + 4) * P / G
  fp32 grad partition   4 * P / G  (DeepSpeed up-casts the bf16 grad partition before the fp32 step; transient)
  ZeRO buffers          ZeRO-2: 2 * 2 * reduce_bucket (overlap_comm double buffer) + 2 * min(allgather_bucket, P)
                        ZeRO-3: 2 * 2 * (largest layer's params)  (the layer being used + one prefetched)
  activations, per text layer, no recompute ("detailed", derived for HF Llama + peft LoRA; PyTorch only saves a
  frozen Linear's input when its weight needs a grad, so frozen matmuls save nothing):
      2 RMSNorms keep an fp32 copy of their input          8 sbh
      SDPA keeps q, k, v (k, v repeated to a heads), out   8 sbh
      SwiGLU keeps gate-out, silu-out, up-out              6 sbi
      LoRA, dropout p>0: per adapted Linear, dropout(x) bf16 + bool mask = 3 * sb * d_in
                         (q,k,v,o,gate,up: d_in=h; down: d_in=i)  -> 18 sbh + 3 sbi
            dropout 0:   the shared inputs (normed x, attn out, normed x2, mlp product) -> 6 sbh + 2 sbi
      LoRA A outputs     2 * sb * r per adapted Linear     14 sbr
    -> 13B, dropout 0.05: 34 sbh + 9 sbi + 14 sbr  (~58 sbh).  For reference Korthikanti et al. 2022 (full training,
       GPT, 4h GeLU MLP, dropout, flash attention so no 5as^2/h term): 34 sbh.
  activations with gradient checkpointing (HF, one checkpoint per decoder layer):
      L * 2 sbh (layer inputs) + one layer recomputed during its backward (the per-layer figure) + 2 * 2 sbh grads
  logits + loss         s*b*V * 14: bf16 logits 2 + fp32 upcast 4 + fp32 log-softmax 4 in the forward; at the start
                        of backward saved log-softmax 4 + nll grad 4 + log-softmax grad 4 + bf16 grad 2 = 14 (peak)
  projector (trained)   b*n_img*(2*dv + 4*h)  (input, GELU input, GELU output, bf16)
  vision tower          frozen and its input needs no grad: forward-only, transient, before the LM forward
  ZeRO-3 after its first step: DeepSpeed keeps parameters gathered that are reused within stage3_max_reuse_distance,
                        up to stage3_max_live_parameters: + p * min(max_live, N) (from the DeepSpeed config)
  peak = static + max(vision forward, LM forward/backward, optimizer step transient)
  + a fixed per-GPU overhead (CUDA context, cuBLAS workspace, NCCL buffers): --overhead-gib (default 1.0)

Distill (HF generate or vLLM, a full bf16 copy of the model per GPU):
  weights 2 * N_total;  KV cache = 2 (K and V) * L * kv * d * 2 bytes * tokens, tokens = seqs * max_model_len
  (max_model_len = prompt incl. image tokens + max_new_tokens); prefill working set ~ 2 * seqs * s_prompt * (2h + 3i)

Time:
  fine-tune FLOPs per sample (LoRA, frozen base, gradient checkpointing):
    text:   fwd 2*N_mm*s  + recompute 2*(N_mm - V*h)*s  + bwd 2*N_mm*s   (activation grads only: frozen weights get
            no weight grads, which is the other 2N of the usual 6N)  -> 6N with recompute, 4N without
            + attention 4*s^2*h per layer fwd * causal 0.5 (flash skips the masked half); bwd = 2x fwd; recompute 1x
            + LoRA 6*N_lora*s (+2*N_lora*s recompute), projector 6*N_proj*n_img
    vision: forward only, 2*N_vis_mm*n_vis_tokens + attention (all layers run, even with vision_feature_layer=-2)
  time = FLOPs / (G * utilisation * bf16 dense peak)  (H100 SXM 989, A100 312 TFLOP/s)
  distill: prefill FLOPs at the same utilisation; decode is memory-bound: per step read the text weights once
    (2 * N_text bytes) + the KV cache so far, at --bw-eff of HBM bandwidth; steps per batch = max_new_tokens (upper
    bound: a batch runs until its longest caption ends); plus --decode-overhead-ms per step (HF generate's Python).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.errors import PipelineError

GIB = 1024 ** 3
FIT_SHARE = 0.92  # of a GPU's memory usable before fragmentation and the allocator's reserve bite

GPUS = {  # bf16 dense TFLOP/s, HBM TB/s, memory GiB
    "H100": (989.0, 3.35, 80), "H200": (989.0, 4.8, 141), "A100": (312.0, 2.039, 80), "A100-40": (312.0, 1.555, 40),
    "L40S": (362.0, 0.864, 48), "A10G": (125.0, 0.6, 24),
}

# transformers' defaults for fields a saved config.json omits (it writes only non-defaults)
TEXT_DEFAULTS = {
    "llama": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  vocab_size=32000, tie_word_embeddings=False),
    "mistral": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    "qwen2": dict(hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=151936, tie_word_embeddings=False),
}
VISION_DEFAULTS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                image_size=224, patch_size=16),
    "idefics3_vision": dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                            image_size=224, patch_size=32),
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

LLAVA_15_13B = {  # llava-hf/llava-1.5-13b-hf config.json (fields as published)
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"architectures": ["LlamaForCausalLM"], "hidden_size": 5120, "intermediate_size": 13824,
                    "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 40,
                    "num_hidden_layers": 40, "num_key_value_heads": 40, "pad_token_id": 0, "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "image_seq_length": 576,
    "tie_word_embeddings": False, "torch_dtype": "float16",
}
PRESETS = {"llava-1.5-13b": LLAVA_15_13B}


@dataclass
class Text:
    h: int
    i: int
    L: int
    a: int
    kv: int
    d: int
    V: int
    tied: bool
    gated: bool = True
    qkv_bias: bool = False
    extra_norms: int = 0  # norm weights a layer has beyond its two RMSNorms (Gemma 3: two more, and q/k norms)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:  # name -> (in, out)
        h, i, a, kv, d = self.h, self.i, self.a, self.kv, self.d
        shapes = {"q_proj": (h, a * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (a * d, h),
                  "up_proj": (h, i), "down_proj": (i, h)}
        if self.gated:
            shapes["gate_proj"] = (h, i)
        return shapes

    def layer_params(self) -> int:
        n = sum(x * y for x, y in self.linear_shapes().values())
        if self.qkv_bias:
            n += (self.a + 2 * self.kv) * self.d
        return n + 2 * self.h + self.extra_norms  # two RMSNorm weights

    def layer_matmul_params(self) -> int:
        return sum(x * y for x, y in self.linear_shapes().values())

    def params(self) -> int:
        return self.L * self.layer_params() + self.V * self.h * (1 if self.tied else 2) + self.h


@dataclass
class Vision:
    d: int
    i: int
    L: int
    heads: int
    n_tokens: int  # tokens the tower runs on per image (incl. CLS)
    extra: int  # embeddings, norms, patch conv: params outside the layers
    gated: bool = False
    bias: bool = True

    def layer_matmul_params(self) -> int:
        return 4 * self.d * self.d + (3 if self.gated else 2) * self.d * self.i

    def layer_params(self) -> int:
        n = self.layer_matmul_params()
        if self.bias:
            n += 4 * self.d + (2 if self.gated else 1) * self.i + self.d
        return n + 4 * self.d  # two LayerNorms (weight + bias)

    def params(self) -> int:
        return self.L * self.layer_params() + self.extra


@dataclass
class Arch:
    family: str
    text: Text
    vision: Vision
    projector: int  # params
    projector_in: int  # width of the features entering it
    image_tokens: int  # LM positions per image
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.text.params() + self.vision.params() + self.projector


def _text(cfg: dict) -> Text:
    tc = dict(cfg.get("text_config") or {})
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "tie_word_embeddings", "head_dim", "model_type"):  # Qwen2-VL (old layout): top level
        if k not in tc and k in cfg:
            tc[k] = cfg[k]
    mt = tc.get("model_type", "llama")
    full = {**TEXT_DEFAULTS.get(mt, TEXT_DEFAULTS["llama"]), **tc}
    a = full["num_attention_heads"]
    kv = full.get("num_key_value_heads") or a
    d = full.get("head_dim") or full["hidden_size"] // a
    tied = bool(full.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))
    qkv_bias = bool(full.get("attention_bias", mt.startswith("qwen2")))
    extra_norms = 2 * full["hidden_size"] + 2 * d if mt.startswith("gemma3") else 0
    return Text(full["hidden_size"], full["intermediate_size"], full["num_hidden_layers"], a, kv, d,
                full["vocab_size"], tied, True, qkv_bias, extra_norms)


def _clip_like(vc: dict, cls: bool, pre_norm: bool, patch_bias: bool) -> Vision:
    mt = vc.get("model_type", "clip_vision_model")
    full = {**VISION_DEFAULTS.get(mt, VISION_DEFAULTS["clip_vision_model"]), **vc}
    d, p, img = full["hidden_size"], full["patch_size"], full["image_size"]
    n_patch = (img // p) ** 2
    n_tok = n_patch + (1 if cls else 0)
    extra = (3 * p * p * d + (d if patch_bias else 0) + n_tok * d + (d if cls else 0) + (2 * d if pre_norm else 0)
             + 2 * d)
    return Vision(d, full["intermediate_size"], full["num_hidden_layers"], full["num_attention_heads"], n_tok, extra)


def arch_from_config(cfg: dict, image_tokens: int | None = None, tiles: int | None = None) -> Arch:
    """Shapes and parameter counts of a VLM from its config.json dict."""
    mt = cfg.get("model_type", "")
    text = _text(cfg)
    vc = cfg.get("vision_config") or {}
    notes: list[str] = []
    clip_like = vc.get("model_type", "").startswith(("clip", "siglip"))
    if mt in ("llava", "llava_next") or (not mt.startswith(("qwen2", "idefics")) and clip_like):
        siglip = vc.get("model_type", "").startswith("siglip")
        vis = _clip_like(vc, cls=not siglip, pre_norm=not siglip, patch_bias=siglip)
        layers = cfg.get("vision_feature_layer", -2)
        n_feat = len(layers) if isinstance(layers, list) else 1
        pin = vis.d * n_feat
        bias = cfg.get("multimodal_projector_bias", True)
        proj = pin * text.h + text.h * text.h + (2 * text.h if bias else 0)
        drops_cls = cfg.get("vision_feature_select_strategy", "default") == "default" and not siglip
        per_img = cfg.get("image_seq_length") or (vis.n_tokens - (1 if drops_cls else 0))
        if mt == "gemma3":  # patches pooled to mm_tokens_per_image soft tokens; an RMSNorm and one projection
            per_img, proj = cfg.get("mm_tokens_per_image", 256), pin + pin * text.h
        elif mt not in ("llava", "llava_next"):
            notes.append(f"{mt}: counted as a LLaVA-1.5-like model (its CLIP/SigLIP tower + a 2-layer MLP "
                         f"projector); image tokens ({per_img}) and projector are approximate: set plan.image_tokens")
        if mt == "llava_next":
            proj += text.h  # image_newline
            side = (vc.get("image_size", 336) // vc.get("patch_size", 14))
            pins = cfg.get("image_grid_pinpoints") or [[672, 672]]
            img = vc.get("image_size", 336)
            worst = max((ph // img) * (pw // img) * side * side + (ph // img) * side for ph, pw in pins)
            ntiles = max((ph // img) * (pw // img) for ph, pw in pins)
            per_img = per_img + worst  # base image + tiles + one newline token per row (before unpadding)
            vis.n_tokens *= (1 + ntiles)  # the tower runs on every tile
            notes.append(f"llava_next: image tokens = upper bound {per_img} (base + {ntiles} tiles + newlines, no "
                         "unpadding)")
        arch = Arch(mt or "llava-like", text, vis, proj, pin, per_img, notes)
    elif mt in ("qwen2_vl", "qwen2_5_vl"):
        if mt == "qwen2_vl":  # embed_dim / depth / mlp_ratio / num_heads; QuickGELU fc1/fc2; fused qkv with bias
            d, L = vc.get("embed_dim", 1280), vc.get("depth", 32)
            i, gated, out = int(d * vc.get("mlp_ratio", 4)), False, vc.get("hidden_size", text.h)
            norm_params = 2 * 2 * d
        else:  # Qwen2.5-VL: hidden_size is the ViT width, SwiGLU MLP, RMSNorm, out_hidden_size
            d, L = vc.get("hidden_size", 1280), vc.get("depth", 32)
            i, gated, out = vc.get("intermediate_size", 3420), True, vc.get("out_hidden_size", text.h)
            norm_params = 2 * d
        p, tp = vc.get("patch_size", vc.get("spatial_patch_size", 14)), vc.get("temporal_patch_size", 2)
        m = vc.get("spatial_merge_size", 2)
        px = 336 if image_tokens is None else None
        n_patch = (px // p) ** 2 if px else image_tokens * m * m
        vis = Vision(d, i, L, vc.get("num_heads", 16), n_patch, 3 * tp * p * p * d, gated, True)
        vis_extra_fix = norm_params - 4 * d  # Vision.layer_params assumes two LayerNorms
        vis.extra += L * vis_extra_fix
        proj = (2 * d if mt == "qwen2_vl" else d) + (4 * d) * (4 * d) + 4 * d + 4 * d * out + out  # merger
        per_img = n_patch // (m * m)
        notes.append(f"{mt}: dynamic resolution; image tokens = (H/{p})(W/{p})/{m * m} = {per_img}"
                     + (" (plan.image_tokens)" if image_tokens else " at 336x336 (set plan.image_tokens)"))
        arch = Arch(mt, text, vis, proj, 4 * d, per_img, notes)
    elif mt == "idefics3":
        vis = _clip_like({"model_type": "idefics3_vision", **vc}, cls=False, pre_norm=False, patch_bias=True)
        sf = cfg.get("scale_factor", 2)
        pin = vis.d * sf * sf
        proj = pin * text.h  # modality_projection, no bias
        per_tile = (vis.n_tokens) // (sf * sf)
        nt = tiles or 1
        vis.n_tokens *= nt
        notes.append(f"idefics3: {per_tile} tokens per tile (pixel shuffle x{sf}); {nt} tile(s) per image "
                     "(up to 16 + 1 global at the default longest_edge 1456; plan.image_tokens sets the total)")
        arch = Arch(mt, text, vis, proj, pin, per_tile * nt, notes)
    else:
        raise PipelineError(f"model_type {mt!r}: the plan knows llava, llava_next, gemma3, qwen2_vl, qwen2_5_vl and "
                            "idefics3 (and approximates other CLIP/SigLIP-tower models as LLaVA-1.5-like)")
    if image_tokens is not None and not mt.startswith("qwen2"):
        arch.image_tokens = image_tokens
    return arch


@dataclass
class Settings:
    r: int = 64
    precision: str = "bf16"  # "fp32": weights/activations 4 bytes, no separate fp32 master copy
    peak_tflops: float | None = None  # override the GPU's bf16 dense peak (e.g. a measured CPU rate)
    max_live: int = 1_000_000_000  # stage3_max_live_parameters
    lora_modules: tuple[str, ...] = LINEARS
    lora_dropout: float = 0.05
    train_projector: bool = True
    batch: int = 16
    text_tokens: int = 80
    seq: int | None = None  # default: image tokens + text tokens
    grad_ckpt: bool = True
    zero: int = 2
    gpus: int = 8
    gpu: str = "H100"
    util: float = 0.40
    overhead_gib: float = 1.0
    reduce_bucket: int | None = None  # elements; HF "auto" = h*h
    allgather_bucket: int = 200_000_000
    samples: int = 10_000
    epochs: float = 1.0
    distill_seqs: int = 32
    max_new_tokens: int = 200
    max_model_len: int | None = None  # default: seq prompt + max_new_tokens
    distill_samples: int = 10_000
    bw_eff: float = 0.7
    decode_overhead_ms: float = 10.0
    link_gbs: float = 200.0  # effective per-GPU collective bandwidth, GB/s (NVLink H100 node; ~10-25 across IB)


def lora_params(t: Text, s: Settings) -> int:
    shapes = t.linear_shapes()
    return t.L * sum(s.r * (shapes[m][0] + shapes[m][1]) for m in s.lora_modules if m in shapes)


def layer_activation_bytes(t: Text, s: Settings, b: int, seq: int) -> dict[str, float]:
    """Bytes one text decoder layer keeps for backward (no recompute), detailed and Korthikanti."""
    sb = seq * b
    h, i = t.h, t.i
    p = 4 if s.precision == "fp32" else 2
    shapes = t.linear_shapes()
    mods = [m for m in s.lora_modules if m in shapes]
    base = 8 * sb * h + 4 * p * sb * t.a * t.d + 3 * p * sb * i  # norms' fp32 input 2*4sbh, SDPA q,k,v,out, SwiGLU
    if s.lora_dropout > 0:
        lora = sum((p + 1) * sb * shapes[m][0] for m in mods)  # dropout output + bool mask
    else:  # dropout is nn.Identity: LoRA A saves the same input tensors the block already has
        shared = {("q_proj", "k_proj", "v_proj"): h, ("o_proj",): h, ("gate_proj", "up_proj"): h, ("down_proj",): i}
        lora = sum(p * sb * w for grp, w in shared.items() if any(m in mods for m in grp))
    lora += p * sb * s.r * len(mods)
    return {"detailed": base + lora, "korthikanti": 34 * sb * h}


def plan(arch: Arch, s: Settings) -> dict:
    t, v = arch.text, arch.vision
    G, b = s.gpus, s.batch
    seq = s.seq or arch.image_tokens + s.text_tokens
    P_lora = lora_params(t, s)
    P_proj = arch.projector if s.train_projector else 0
    P = P_lora + P_proj  # trainable (peft modules_to_save: a trainable copy of the projector beside the frozen one)
    N_base = arch.total
    z3 = s.zero == 3
    p = 4 if s.precision == "fp32" else 2
    opt = 8 if p == 4 else 12  # fp32 run: the params are the master copy
    rows: list[tuple[str, float, str]] = []
    rows.append(("frozen weights", p * N_base / (G if z3 else 1), f"{p}*{N_base:,}" + (f"/{G}" if z3 else "")))
    rows.append(("trainable params", p * P / (G if z3 else 1),
                 f"{p}*P, P={P:,} (LoRA {P_lora:,} + projector {P_proj:,})" + (f"/{G}" if z3 else "")))
    rows.append(("gradients (partition)", p * P / G, f"{p}*P/{G}"))
    rows.append(("fp32 master + Adam m, v" if p == 2 else "Adam m, v (fp32)", opt * P / G, f"{opt}*P/{G}"))
    largest = max(t.layer_params(), t.V * t.h)
    if z3:
        buf = p * 2 * largest
        buf_f = f"{p}*2*{largest:,} (gathered layer + prefetch)"
    else:
        rb = s.reduce_bucket or t.h * t.h
        buf = p * 2 * rb + p * min(s.allgather_bucket, P)
        buf_f = f"{p}*2*{rb:,} reduce + {p}*min({s.allgather_bucket:,}, P) allgather"
    rows.append(("ZeRO buffers", buf, buf_f))
    if z3:
        live = min(s.max_live, N_base)
        rows.append(("ZeRO-3 live parameters", p * live,
                     f"{p}*min(stage3_max_live_parameters {s.max_live:.0e}, N): kept gathered once traced"))
    rows.append(("per-GPU overhead (CUDA ctx, NCCL)", s.overhead_gib * GIB, f"{s.overhead_gib} GiB, assumed"))
    static = sum(r[1] for r in rows)

    per_layer = layer_activation_bytes(t, s, b, seq)
    sbh = seq * b * t.h
    lb = 14 if p == 2 else 12
    logits = lb * seq * b * t.V
    proj_act = b * arch.image_tokens * (p * arch.projector_in + 2 * p * t.h) if s.train_projector else 0
    embeds = p * sbh + 4 * sbh  # inputs_embeds + final norm's fp32 copy
    if s.grad_ckpt:
        ckpt = t.L * p * sbh
        act_lm = ckpt + embeds + proj_act + max(logits, per_layer["detailed"] + 2 * p * sbh)
        act_f = (f"L*{p}sbh {ckpt / GIB:.2f} + max(logits {lb}sbV {logits / GIB:.2f}, one layer "
                 f"{per_layer['detailed'] / GIB:.2f}"
                 f" + grads) + embeds/final norm {p + 4}sbh + projector {proj_act / GIB:.2f}")
    else:
        act_lm = t.L * per_layer["detailed"] + embeds + proj_act + logits
        act_f = (f"L*layer {t.L * per_layer['detailed'] / GIB:.2f} + logits {lb}sbV {logits / GIB:.2f} + embeds + "
                 "projector")
    n_vis_img = b * v.n_tokens
    vis_fwd = p * n_vis_img * v.d * (v.L + 1) + p * n_vis_img * (4 * v.d + v.i)
    step_tr = 4 * P / G
    peak = static + max(act_lm, vis_fwd, step_tr)
    rows.append(("activations (LM fwd/bwd peak)", act_lm, act_f))
    rows.append(("  (vision fwd transient, not added)", vis_fwd, "2*b*n_vis*dv*(Lv+1) hidden states + one layer"))
    rows.append(("  (fp32 grad partition at step, not added)", step_tr, f"4*P/{G}"))
    korth = (t.L if not s.grad_ckpt else 1) * per_layer["korthikanti"]

    # ---- time ----
    hidden_mm = t.L * t.layer_matmul_params()
    N_mm = hidden_mm + t.V * t.h
    attn_fwd = t.L * 4 * seq * seq * t.h * 0.5  # per sample, causal half
    fl_text = 2 * N_mm * seq + 2 * N_mm * seq + (2 * hidden_mm * seq if s.grad_ckpt else 0)
    fl_attn = attn_fwd * (1 + 2 + (1 if s.grad_ckpt else 0))
    fl_lora = (6 + (2 if s.grad_ckpt else 0)) * P_lora * seq
    fl_proj = 6 * P_proj * arch.image_tokens
    vis_mm = v.L * v.layer_matmul_params()
    fl_vis = 2 * vis_mm * v.n_tokens + v.L * 4 * v.n_tokens ** 2 * v.d
    fl_sample = fl_text + fl_attn + fl_lora + fl_proj + fl_vis
    peak_tf, hbm, gpu_mem = GPUS[s.gpu]
    if s.peak_tflops:
        peak_tf = s.peak_tflops
    n_samples = s.samples * s.epochs
    t_step_train = b * fl_sample / (s.util * peak_tf * 1e12)
    t_train = n_samples * fl_sample / (G * s.util * peak_tf * 1e12)
    # communication per optimizer step per GPU (ring collectives move ~(G-1)/G of the data): ZeRO-3 all-gathers the
    # bf16 weights for the forward, the recompute and the backward; both stages reduce-scatter grads + all-gather P
    steps = math.ceil(n_samples / (b * G))
    gathers = (3 if s.grad_ckpt else 2) if z3 else 0
    comm = (G - 1) / G * (gathers * 2 * N_base + 2 * 2 * P) if G > 1 else 0
    t_comm = steps * comm / (s.link_gbs * 1e9)

    # ---- distill ----
    mml = s.max_model_len or (seq - s.text_tokens + 20 + s.max_new_tokens)  # prompt ~ image + 20 instruction tokens
    prompt = mml - s.max_new_tokens
    kv_tok = 2 * t.L * t.kv * t.d * 2
    kv = kv_tok * mml * s.distill_seqs
    w_all = 2 * N_base
    prefill_ws = 2 * s.distill_seqs * prompt * (2 * t.h + 3 * t.i)
    d_rows = [("weights (bf16, full copy)", w_all, f"2*{N_base:,}"),
              ("KV cache", kv, f"2*L*kv*d*2B = {kv_tok:,} B/token * {mml} tokens * {s.distill_seqs} seqs"),
              ("prefill working set", prefill_ws, "2*seqs*s_prompt*(2h+3i)"),
              ("overhead", s.overhead_gib * GIB, "assumed")]
    batches = math.ceil(s.distill_samples / s.distill_seqs)
    fl_prefill = s.distill_seqs * (2 * N_mm * prompt + t.L * 4 * prompt * prompt * t.h * 0.5 + fl_vis)
    t_prefill = fl_prefill / (s.util * peak_tf * 1e12)
    w_text = 2 * (t.L * t.layer_params() + t.V * t.h)  # bytes read per decode step (lm_head + layers)
    kv_avg = kv_tok * s.distill_seqs * (prompt + s.max_new_tokens / 2)
    t_step_mem = (w_text + kv_avg) / (hbm * 1e12 * s.bw_eff)
    t_step_cmp = 2 * N_mm * s.distill_seqs / (s.util * peak_tf * 1e12)
    t_step = max(t_step_mem, t_step_cmp)
    t_batch = t_prefill + s.max_new_tokens * (t_step + s.decode_overhead_ms / 1e3)
    t_distill = batches * t_batch / G
    return {
        "seq": seq, "P": P, "P_lora": P_lora, "P_proj": P_proj, "N_total": N_base, "N_text": t.params(),
        "N_vision": v.params(), "N_projector": arch.projector, "rows": rows, "static": static, "peak": peak,
        "per_layer": per_layer, "korthikanti_total": korth, "flops_sample": fl_sample,
        "flops_parts": {"text": fl_text, "attn": fl_attn, "lora": fl_lora, "proj": fl_proj, "vision": fl_vis},
        "t_train_s": t_train, "t_step_train_s": t_step_train, "steps": steps, "comm_step_bytes": comm,
        "t_comm_s": t_comm, "d_rows": d_rows, "d_peak": sum(r[1] for r in d_rows), "mml": mml,
        "t_prefill_batch": t_prefill, "t_step": t_step, "t_step_mem": t_step_mem, "t_step_cmp": t_step_cmp,
        "t_distill_s": t_distill, "batches": batches, "gpu_mem_gib": gpu_mem,
    }


def fmt_time(sec: float) -> str:
    return f"{sec:.0f} s" if sec < 120 else f"{sec / 60:.1f} min" if sec < 7200 else f"{sec / 3600:.2f} h"


def report_one(arch: Arch, s: Settings, r: dict) -> str:
    """Every row of one plan with its formula."""
    t, v = arch.text, arch.vision
    out = [f"model {arch.family}: text h={t.h} i={t.i} L={t.L} a={t.a} kv={t.kv} d={t.d} V={t.V} tied={t.tied}; "
           f"vision d={v.d} i={v.i} L={v.L} tokens/img={v.n_tokens}; image tokens in LM={arch.image_tokens}",
           f"params: total {r['N_total']:,} = text {r['N_text']:,} + vision {r['N_vision']:,} + projector "
           f"{r['N_projector']:,}; trainable P = {r['P']:,} (LoRA r={s.r} on {','.join(s.lora_modules)}: "
           f"{r['P_lora']:,}; projector {r['P_proj']:,})", *arch.notes,
           f"\nFINE-TUNE per GPU: ZeRO-{s.zero}, {s.gpus}x {s.gpu}, b={s.batch}, s={r['seq']}, grad ckpt "
           f"{'on' if s.grad_ckpt else 'off'}, LoRA dropout {s.lora_dropout}, AdamW fp32 states, {s.precision}"]
    w = max(len(x[0]) for x in r["rows"]) + 2
    for name, by, f in r["rows"]:
        out.append(f"  {name:<{w}} {by / GIB:8.2f} GiB   {f}")
    out.append(f"  {'PEAK (static + max phase)':<{w}} {r['peak'] / GIB:8.2f} GiB   of {r['gpu_mem_gib']} GiB"
               + ("   <-- DOES NOT FIT" if r["peak"] / GIB > r["gpu_mem_gib"] * 0.92 else ""))
    pl = r["per_layer"]
    out.append(f"  one layer, no recompute: detailed {pl['detailed'] / GIB:.2f} GiB "
               f"({pl['detailed'] / (r['seq'] * s.batch * t.h):.1f} sbh); Korthikanti 34sbh "
               f"{pl['korthikanti'] / GIB:.2f} GiB")
    fp = r["flops_parts"]
    out.append(f"\nTIME: {r['flops_sample'] / 1e12:.1f} TFLOP/sample (text {fp['text'] / 1e12:.1f}, attention "
               f"{fp['attn'] / 1e12:.2f}, LoRA {fp['lora'] / 1e12:.2f}, projector {fp['proj'] / 1e12:.3f}, vision "
               f"{fp['vision'] / 1e12:.2f}); {s.samples * s.epochs:,.0f} samples at {s.util:.0%} of "
               f"{s.peak_tflops or GPUS[s.gpu][0]:g} TFLOP/s x {s.gpus} -> {fmt_time(r['t_train_s'])} per "
               f"{s.epochs} epoch(s) ({r['t_step_train_s']:.2f} s/step of b={s.batch})")
    out.append(f"  {r['steps']} steps; communication {r['comm_step_bytes'] / 1e9:.1f} GB/step/GPU at "
               f"{s.link_gbs:.0f} GB/s -> {fmt_time(r['t_comm_s'])} if not overlapped (ZeRO-3 gathers 2*N_total "
               f"{2 if not s.grad_ckpt else 3}x/step)")
    out.append(f"\nDISTILL per GPU: {s.distill_seqs} seqs x max_model_len {r['mml']} (prompt + {s.max_new_tokens} new)")
    for name, by, f in r["d_rows"]:
        out.append(f"  {name:<{w}} {by / GIB:8.2f} GiB   {f}")
    out.append(f"  {'PEAK':<{w}} {r['d_peak'] / GIB:8.2f} GiB   of {r['gpu_mem_gib']} GiB")
    out.append(f"  decode step {r['t_step'] * 1e3:.1f} ms (memory {r['t_step_mem'] * 1e3:.1f}, compute "
               f"{r['t_step_cmp'] * 1e3:.1f}) + {s.decode_overhead_ms} ms overhead; prefill "
               f"{r['t_prefill_batch']:.2f} s/batch; {r['batches']} batches on {s.gpus} GPU(s) -> "
               f"{fmt_time(r['t_distill_s'])} ({s.distill_samples:,} images, {s.max_new_tokens} decode steps/batch)")
    return "\n".join(out)




def settings_from_config(cfg: Config, *, zero: int, grad_ckpt: bool | None = None) -> Settings:
    """The plan's settings from a pipeline config: LoRA, batch, checkpointing and precision of ``teacher``, the GPUs
    of ``slurm`` and ``plan``, generation of ``distill``, DeepSpeed's live-parameter limit from its config file."""
    t, pc = cfg.teacher, cfg.plan
    if pc.gpu not in GPUS:
        raise PipelineError(f"plan.gpu: {pc.gpu!r} is not one of {sorted(GPUS)}")
    max_live = 1_000_000_000
    if t.train.deepspeed is not None and Path(t.train.deepspeed).is_file():
        zero_cfg = json.loads(Path(t.train.deepspeed).read_text()).get("zero_optimization", {})
        max_live = int(zero_cfg.get("stage3_max_live_parameters", max_live))
    gpus = pc.gpus or max(1, cfg.slurm.gpus_per_node) * cfg.slurm.nodes.get("finetune", 1)
    return Settings(
        r=t.lora.r, precision="fp32" if t.precision == "fp32" else "bf16", max_live=max_live,
        lora_modules=tuple(t.lora.target_modules), lora_dropout=t.lora.dropout, train_projector=t.lora.train_projector,
        batch=t.train.per_device_batch_size, text_tokens=pc.text_tokens, seq=None,
        grad_ckpt=t.train.gradient_checkpointing if grad_ckpt is None else grad_ckpt, zero=zero, gpus=gpus,
        gpu=pc.gpu, util=pc.utilization, overhead_gib=pc.overhead_gib, samples=pc.train_samples,
        epochs=t.train.epochs, distill_seqs=cfg.distill.batch_size, max_new_tokens=cfg.distill.max_new_tokens,
        distill_samples=pc.distill_images * cfg.distill.samples_per_image)


def read_teacher_config(path: Path) -> dict:
    """The teacher checkpoint's config.json (one line naming the file when it is missing or unreadable)."""
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise PipelineError(f"teacher.model: {file} does not exist (the plan needs the checkpoint's config.json "
                            "only: download it alone, e.g. huggingface-cli download <repo> config.json)") from None
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{file}: not JSON ({exc})") from None


def plan_config(cfg: Config) -> tuple[str, dict]:
    """The plan of ``cfg``'s teacher: a readable report and its figures (GiB, seconds) for ZeRO-2 and ZeRO-3, with
    and without gradient checkpointing."""
    arch = arch_from_config(read_teacher_config(cfg.teacher.model), cfg.plan.image_tokens)
    plans = {(z, ck): plan(arch, settings_from_config(cfg, zero=z, grad_ckpt=ck)) for z in (2, 3)
             for ck in (True, False)}
    s = settings_from_config(cfg, zero=2)
    ckpt = s.grad_ckpt
    main = plans[(2, ckpt)]
    gpu_mem = main["gpu_mem_gib"]
    lines = [report_one(arch, s, main).split("\nFINE-TUNE")[0], "",
             f"FINE-TUNE per GPU, GiB: {s.gpus}x {s.gpu} ({gpu_mem} GiB), b={s.batch}, s={main['seq']}, LoRA r={s.r}"
             f"{' + projector' if s.train_projector else ''}, {s.precision}"]
    names = [n for n, _, _ in plans[(3, ckpt)]["rows"] if not n.startswith("  ")]
    lines.append(f"  {'':<36}{'ZeRO-2':>10}{'ZeRO-3':>10}")
    for name in names:
        vals = [dict((n, b) for n, b, _ in plans[(z, ckpt)]["rows"]).get(name) for z in (2, 3)]
        if name.startswith("activations"):
            continue
        lines.append(f"  {name:<36}" + "".join(f"{v / GIB:>10.2f}" if v is not None else f"{'-':>10}" for v in vals))
    figures: dict = {"gpu": s.gpu, "gpus": s.gpus, "gpu_memory_gib": gpu_mem, "batch": s.batch, "seq": main["seq"],
                     "parameters": main["N_total"], "trainable": main["P"]}
    for ck in (True, False):
        act = [dict((n, b) for n, b, _ in plans[(z, ck)]["rows"])["activations (LM fwd/bwd peak)"] for z in (2, 3)]
        label = "with" if ck else "without"
        lines.append(f"  {'activations, ' + label + ' checkpointing':<36}" + "".join(f"{a / GIB:>10.2f}" for a in act))
    for ck in (True, False):
        peaks = [plans[(z, ck)]["peak"] / GIB for z in (2, 3)]
        label = f"PEAK, {'with' if ck else 'without'} checkpointing"
        fits = ["fits" if p <= FIT_SHARE * gpu_mem else "NO" for p in peaks]
        lines.append(f"  {label:<36}" + "".join(f"{p:>10.2f}" for p in peaks) + f"   fits {gpu_mem} GiB: "
                     f"{fits[0]} / {fits[1]}")
        for z, p, f in zip((2, 3), peaks, fits):
            figures[f"zero{z}_{'ckpt' if ck else 'no_ckpt'}_peak_gib"] = round(p, 2)
            figures[f"zero{z}_{'ckpt' if ck else 'no_ckpt'}_fits"] = f == "fits"
    fp = main["flops_parts"]
    lines += ["", f"TIME: {main['flops_sample'] / 1e12:.1f} TFLOP a sample (text {fp['text'] / 1e12:.1f}, attention "
              f"{fp['attn'] / 1e12:.2f}, LoRA {fp['lora'] / 1e12:.2f}, projector {fp['proj'] / 1e12:.3f}, vision "
              f"{fp['vision'] / 1e12:.2f}) at {s.util:.0%} of {GPUS[s.gpu][0]:g} TFLOP/s x {s.gpus}:",
              f"  finetune: {s.samples:,} samples x {s.epochs:g} epoch(s) = {main['steps']} steps -> "
              f"{fmt_time(main['t_train_s'])} (ZeRO-3 adds up to {fmt_time(plans[(3, ckpt)]['t_comm_s'])} of "
              f"all-gathers where they do not overlap)"]
    lines.append(f"\nDISTILL per GPU: {s.distill_seqs} sequences x {main['mml']} tokens (prompt + "
                 f"{s.max_new_tokens} new), GiB")
    for name, by, _ in main["d_rows"]:
        lines.append(f"  {name:<36}{by / GIB:>10.2f}")
    lines.append(f"  {'PEAK':<36}{main['d_peak'] / GIB:>10.2f}   fits {gpu_mem} GiB: "
                 f"{'fits' if main['d_peak'] / GIB <= FIT_SHARE * gpu_mem else 'NO'}")
    lines.append(f"  {s.distill_samples:,} captions a dataset on {s.gpus} GPU(s): {fmt_time(main['t_distill_s'])} "
                 f"(decode step {main['t_step'] * 1e3:.1f} ms + {s.decode_overhead_ms:g} ms overhead, prefill "
                 f"{main['t_prefill_batch']:.2f} s a batch)")
    figures.update({"finetune_epoch_s": round(main["t_train_s"] / s.epochs), "distill_peak_gib":
                    round(main["d_peak"] / GIB, 2), "distill_dataset_s": round(main["t_distill_s"]),
                    "utilization": s.util})
    return "\n".join(lines), figures
