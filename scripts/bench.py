"""`make bench`: performance figures measured side by side in one run, printed as a table.

Sections (``--only name,name``):
- prepare: `prepare` over a 44,096-record dataset (the full DeepFashion-MultiModal size) with small images;
- teacher: the demo teacher's fine-tuning samples/s and peak memory, then batched vs sequential (batch 1) caption
  generation throughput as a ratio (on a GPU also a 13B-shaped random LLaVA: samples/s, memory, MFU);
- students: training captions/s with the feature cache + batching vs the course project's way (batch 1, encoder run
  every step) on the same model and data, as a ratio; and an epoch of the attention GRU and the Transformer with
  random vs length-grouped batches (``students.group_by_length``), as a ratio; and the demo's CNN encoders training
  in NCHW vs channels-last memory format, as a ratio;
- engines: the teacher's generation engines side by side, HF ``generate`` vs vLLM (``distill.engine``), greedy on the
  same random tiny LLaVA, images and CPU threads, at the demo teacher's size and a larger one where decoding dominates
  the engines' overheads (needs ``make vllm-env``; skipped, saying so, without it);
- metrics: time to score 2,538 test captions with BLEU, METEOR, ROUGE-L and CIDEr-D;
- ngram: ``students.no_repeat_ngram`` on a finished run (``--config``, overrides): every student decodes the
  ground-truth validation split with n-gram blocking off and at n = 2, 3, 4 (:mod:`pipeline.workflows.repetition`):
  validation attribute accuracy, CIDEr-D and repeated n-grams per student, the paired bootstrap pooled;
- speed: what distillation buys, on a finished run (``--config``, ``key=value`` overrides): the fine-tuned teacher
  and every student captioning the same test images on the CPU at each ``--speed-batch-sizes`` (PyTorch, and
  onnxruntime for students, exported first where needed), with parameters and size on disk; written to
  ``<run_dir>/speed/speed.json``, which `make report` turns into a table, ``speed_quality.png`` and one sentence.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from argparse import Namespace
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from pipeline.core.archs import ARCHS
from pipeline.core.config import Config, load_config  # noqa: E402
from pipeline.core.cpus import cpu_share  # noqa: E402
from pipeline.core.errors import PipelineError  # noqa: E402
from pipeline.core.rundir import RunDir  # noqa: E402
from pipeline.demo.synthetic import load_caption_pool  # noqa: E402
from pipeline.inference.speed import SpeedSettings, require_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCHES: dict[str, Callable[..., dict]] = {}


def bench(fn: Callable[..., dict]) -> Callable[..., dict]:
    BENCHES[fn.__name__.removeprefix("bench_")] = fn
    return fn


@bench
def bench_prepare(work: Path, n: int = 44_096) -> dict:
    """`prepare` over a full-size (44,096-record) single-file dataset with small images, full pixel decode."""
    from stages import prepare

    raw = work / "raw44k"
    (raw / "images").mkdir(parents=True)
    captions = [c for split in load_caption_pool().values() for c in split.values()]
    names = [f"{'WOMEN' if i % 3 else 'MEN'}-Tees_Tanks-id_{i // 4:08d}-01_{i % 4 + 1}_front.jpg" for i in range(n)]
    tile = Image.new("RGB", (24, 24), (90, 120, 150))
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda name: tile.save(raw / "images" / name, quality=90), names))
    (raw / "captions.json").write_text(json.dumps({name: captions[i % len(captions)] for i, name in enumerate(names)}))
    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      [f"run_dir={work / 'run'}", f"data.root={raw}", "data.synthetic=null"])
    t0 = time.perf_counter()
    prepare.run(cfg, Namespace(force=True))
    seconds = time.perf_counter() - t0
    return {"records": n, "prepare_seconds": round(seconds, 2), "records_per_s": round(n / seconds),
            "target": "< 120 s on 2 cores"}


def _demo_world(work: Path, *overrides: str):
    """A small DeepFashion-lite run prepared in ``work`` (demo settings otherwise)."""
    from stages import prepare

    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"run_dir={work / 'run'}", f"data.root={work / 'raw'}",
                                                       f"teacher.model={work / 'tiny-llava'}", *overrides])
    prepare.run(cfg, Namespace(force=False))
    return cfg


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@bench
def bench_teacher(work: Path) -> dict:
    """Fine-tune the demo teacher, then caption images batched (32) and one at a time (16 of the same images)."""
    import torch

    from pipeline.data.formats import load_captions, split_rows
    from pipeline.data.images import load_rgb
    from pipeline.teacher.generate import generate_captions
    from pipeline.teacher.loading import load_processor, load_teacher
    from stages import finetune

    cfg = _demo_world(work, "teacher.train.eval_generation_samples=0")  # the demo's teacher, trained as in the demo
    finetune.run(cfg, Namespace(force=False))
    fig = json.loads((cfg.run_dir / "teacher" / "manifest.json").read_text())["figures"]
    rows = split_rows(load_captions(cfg.run_dir / "data" / "captions"), "train")
    images = [load_rgb(r["image_path"]) for r in rows[:64]]
    ids = [r["image_id"] for r in rows[:64]]
    processor = load_processor(cfg.run_dir / "teacher" / "adapter")
    model = load_teacher(cfg.teacher.model, cfg.run_dir / "teacher" / "adapter", precision="fp32", merge=True)
    kw = dict(seed=0, temperature=0.9, top_p=1.0, max_new_tokens=cfg.distill.max_new_tokens)
    t0 = time.perf_counter()
    for i in range(16):
        generate_captions(model, processor, images[i: i + 1], ids[i: i + 1], **kw)
    sequential = 16 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(0, 64, 32):
        generate_captions(model, processor, images[i: i + 32], ids[i: i + 32], **kw)
    batched = 64 / (time.perf_counter() - t0)
    out = {"finetune_samples_per_s": fig["train_samples_per_second"], "finetune_peak_rss_mb": round(_peak_rss_mb()),
           "generate_batch1_images_per_s": round(sequential, 2), "generate_batch32_images_per_s": round(batched, 2),
           "generate_batched_vs_sequential": round(batched / sequential, 1), "target": ">= 8x on CPU"}
    if torch.cuda.is_available():
        out.update(_gpu_llava_13b())
    return out


def _gpu_llava_13b() -> dict:
    """A 13B-shaped LLaVA (Vicuna-13B + CLIP ViT-L/14-336) with random weights: training step throughput + MFU."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.requires_grad_(False)
    model.gradient_checkpointing_enable()
    model.model.language_model.layers[-1].requires_grad_(True)  # a trainable slice: backward runs through all
    batch, seq = 4, 576 + 96
    ids = torch.randint(0, 32000, (batch, seq), device="cuda")
    ids[:, 1:577] = 32000
    pixels = torch.randn(batch, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    for i in range(4):
        if i == 1:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
    torch.cuda.synchronize()
    step = (time.perf_counter() - t0) / 3
    params = sum(p.numel() for p in model.parameters())
    flops = 6 * params * batch * seq  # forward + backward, dense approximation
    peak = {"H100": 989e12, "H200": 989e12}
    name = torch.cuda.get_device_name()
    mfu = flops / step / next((v for k, v in peak.items() if k in name), 989e12)
    return {"gpu": name, "llava13b_samples_per_s": round(batch / step, 2),
            "llava13b_peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1), "llava13b_mfu": round(mfu, 3)}


@bench
def bench_students(work: Path) -> dict:
    """Captions/s of one training epoch with cached features + batch 64 vs batch 1 with the encoder every step
    (the course project's way); also batch 64 with the encoder fine-tuned in the loop
    (``students.encoder.finetune``)."""
    import torch

    from pipeline.data.formats import load_captions, split_rows
    from pipeline.students.decoders import build_decoder
    from pipeline.students.encoders import BUILDERS, build_encoder, encoder_module, torchvision_model
    from pipeline.students.features import EncoderFeatures, ImageFiles, cached_features
    from pipeline.students.train import caption_loss, epoch_batches, pad_batch
    from pipeline.students.vocab import Vocabulary

    # random encoder weights: throughput does not depend on them, and the stand-ins would take minutes to train
    cfg = _demo_world(work, "data.synthetic.num_images=800", "students.encoder.pretrained=false",
                      "students.encoder.stand_in=null")
    s = cfg.students
    rows = split_rows(load_captions(cfg.run_dir / "data" / "captions"), "train")
    vocab = Vocabulary.build([r["caption"] for r in rows], s.min_word_count)
    targets = [vocab.encode(r["caption"], s.max_length) for r in rows]
    paths = [r["image_path"] for r in rows]

    def two_rate_adam(model, encoder):
        """Adam with the decoder and encoder learning rates (the encoder fine-tuned), and the parameters to clip."""
        opt = torch.optim.Adam([{"params": model.parameters(), "lr": s.decoder_lr},
                                {"params": encoder.parameters(), "lr": s.encoder_lr}])
        return opt, list(model.parameters()) + list(encoder.parameters())

    def step(model, opt, feats, seqs, params):
        seq = pad_batch(seqs)
        logits, _ = model(feats, seq[:, :-1])
        loss = caption_loss(logits, seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()

    # the course project's way: batch 1, the encoder (fine-tuned, lr 1e-5) recomputed for every caption
    torch.manual_seed(0)
    encoder = build_encoder("vgg19", s.encoder)
    images = ImageFiles(paths, s.encoder.image_size)
    model = build_decoder("vgg19_gru", encoder(images[0][None]).shape[-1], len(vocab), s)
    opt, params = two_rate_adam(model, encoder)
    n_seed = 40
    t0 = time.perf_counter()
    for i in range(n_seed):
        step(model, opt, encoder(images[i][None]), [targets[i]], params)
    seed_rate = n_seed / (time.perf_counter() - t0)
    # ours: features computed once (timed too), then batched decoder-only epochs
    t0 = time.perf_counter()
    table, _ = cached_features(work / "cache", "vgg19", s.encoder, 0, paths)
    cache_seconds = time.perf_counter() - t0
    model = build_decoder("vgg19_gru", table.shape[-1], len(vocab), s)
    opt = torch.optim.Adam(model.parameters(), lr=s.decoder_lr)
    t0 = time.perf_counter()
    for i in range(0, len(rows), 64):
        step(model, opt, table[i: i + 64], targets[i: i + 64], list(model.parameters()))
    ours_rate = len(rows) / (time.perf_counter() - t0)
    # the stage with students.encoder.finetune=true: batch 64, the encoder run and trained in the loop
    torch.manual_seed(0)
    encoder = build_encoder("vgg19", s.encoder)
    feats = EncoderFeatures("vgg19_gru", encoder, s.encoder.image_size, {"train": paths})
    model = build_decoder("vgg19_gru", feats.dim, len(vocab), s)
    opt, params = two_rate_adam(model, encoder)
    n_batches = 4
    t0 = time.perf_counter()
    for i in range(0, 64 * n_batches, 64):
        step(model, opt, feats("train", torch.arange(i, i + 64)), targets[i: i + 64], params)
    finetune_rate = 64 * n_batches / (time.perf_counter() - t0)
    # one epoch of the costly decoders on cached features: random batches vs batches grouped by caption length
    def off_and_on(rate: Callable[[bool], float]) -> tuple[float, float]:
        """``rate(False)`` and ``rate(True)`` alternated, the best of two each (the first run also warms up)."""
        rates = [0.0, 0.0]
        for on in (False, True) * 2:
            rates[on] = max(rates[on], rate(on))
        return rates[0], rates[1]

    lengths = [len(t) for t in targets]
    grouped = {}
    for arch in ("resnet101_attn_gru", "vit_transformer"):
        table, _ = cached_features(work / "cache", ARCHS[arch].encoder, s.encoder, 0, paths)

        def epoch_rate(group_by_length: bool, arch: str = arch, table: torch.Tensor = table) -> float:
            torch.manual_seed(0)
            model = build_decoder(arch, table.shape[-1], len(vocab), s)
            opt = torch.optim.Adam(model.parameters(), lr=s.decoder_lr)
            t0 = time.perf_counter()
            for b in epoch_batches(lengths, s.batch_size, torch.Generator().manual_seed(0), group_by_length):
                step(model, opt, table[b], [targets[i] for i in b], list(model.parameters()))
            return len(rows) / (time.perf_counter() - t0)

        random_rate, grouped_rate = off_and_on(epoch_rate)
        grouped[arch] = {"random_captions_per_s": round(random_rate, 1),
                         "grouped_captions_per_s": round(grouped_rate, 1),
                         "speedup": round(grouped_rate / random_rate, 2)}
    # the demo's CNN encoders training (stand-ins, students.encoder.finetune): NCHW vs channels-last memory format
    layout = {}
    images = torch.stack([ImageFiles(paths, s.encoder.image_size)[i] for i in range(32)])
    for name in ("vgg19", "resnet101"):

        def training_rate(channels_last: bool, name: str = name) -> float:
            torch.manual_seed(0)
            model = torchvision_model(name, s.encoder)
            encoder = encoder_module(name, model) if channels_last else BUILDERS[name](model)
            opt = torch.optim.AdamW(encoder.parameters())
            t0 = time.perf_counter()
            for _ in range(3):
                loss = encoder(images).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            return 3 * len(images) / (time.perf_counter() - t0)

        nchw_rate, channels_last_rate = off_and_on(training_rate)
        layout[name] = {"nchw_images_per_s": round(nchw_rate, 1),
                        "channels_last_images_per_s": round(channels_last_rate, 1),
                        "speedup": round(channels_last_rate / nchw_rate, 2)}
    return {"captions": len(rows), "seed_way_captions_per_s": round(seed_rate, 1),
            "cached_batched_captions_per_s": round(ours_rate, 1), "speedup": round(ours_rate / seed_rate, 1),
            "encoder_finetune_batched_captions_per_s": round(finetune_rate, 1),
            "feature_cache_build_seconds": round(cache_seconds, 1),
            "speedup_including_cache_build_1_epoch": round(len(rows) / (len(rows) / ours_rate + cache_seconds)
                                                           / seed_rate, 1),
            "target": ">= 50x on CPU", "group_by_length": grouped, "encoder_training_layout": layout}


@bench
def bench_metrics(work: Path) -> dict:
    """Score 2,538 captions (the course test split size) against references with all four metrics: the first call
    of a new scorer (METEOR's jar starts and loads its paraphrase tables meanwhile) and later calls (the jar kept
    alive, as in validation rounds), against pycocoevalcap's own scorers called one after another."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from pipeline.evaluation.metrics import CaptionScorer

    pool = load_caption_pool()
    refs = {k: [v] for k, v in list(pool["test"].items())[:2538]}
    train = list(pool["train"].values())
    hyps = {k: train[i] for i, k in enumerate(refs)}

    t0 = time.perf_counter()
    scorer = CaptionScorer()
    ours = scorer.score(refs, hyps)
    first = time.perf_counter() - t0
    warm = []
    for _ in range(3):
        t0 = time.perf_counter()
        scorer.score(refs, hyps)
        warm.append(time.perf_counter() - t0)
    scorer.close()

    def plain_pycocoevalcap(meteor: Meteor, tok: PTBTokenizer) -> float:
        """The four scorers called one after another, as pycocoevalcap's own scripts do; METEOR's score."""
        gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
        res = tok.tokenize({k: [{"caption": v}] for k, v in hyps.items()})
        Bleu(4).compute_score(gts, res, verbose=0)
        Rouge().compute_score(gts, res)
        Cider().compute_score(gts, res)
        return meteor.compute_score(gts, res)[0]

    t0 = time.perf_counter()
    meteor, tok = Meteor(), PTBTokenizer()
    reference_meteor = plain_pycocoevalcap(meteor, tok)
    plain_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain_pycocoevalcap(meteor, tok)
    plain_warm = time.perf_counter() - t0
    del meteor
    warm_median = sorted(warm)[1]
    return {"captions": len(refs), "first_call_seconds": round(first, 2),
            "warm_call_seconds_median": round(warm_median, 2),
            "pycocoevalcap_plain_first_seconds": round(plain_first, 2),
            "pycocoevalcap_plain_warm_seconds": round(plain_warm, 2),
            "warm_speedup": round(plain_warm / warm_median, 1),
            "METEOR_equal": ours["METEOR"] == reference_meteor, "CIDEr-D": round(ours["CIDEr-D"], 3),
            "target": "< 10 s on 2 cores"}


ENGINE_MODELS = {  # (TinyTeacher settings) the demo's teacher shape, and a larger one where decoding dominates
    "demo": {"num_layers": 4},
    "larger": {"hidden_size": 768, "num_layers": 8, "num_heads": 12, "intermediate_size": 2048},
}


@bench
def bench_engines(work: Path, images: int = 64, max_new_tokens: int = 64) -> dict:
    """HF ``generate`` vs vLLM (CPU build) greedy on the same random tiny LLaVA, images and threads, at the demo's
    teacher size and a larger one: images/s and new tokens/s of generation alone (HF batch 1 and 32; vLLM one call
    of every image, at most 32 decoded together), each engine's start, and how many greedy captions agree (random
    weights have near-tied logits: the order of a float sum can flip a token; HF batch 1 vs 32 shows how often)."""
    import torch

    from pipeline.core.config import TinyTeacher
    from pipeline.data.formats import load_captions, split_rows
    from pipeline.data.images import load_rgb
    from pipeline.demo.tiny_llava import build_tiny_llava
    from pipeline.teacher.collator import build_prompt
    from pipeline.teacher.generate import clean_caption, generate_captions
    from pipeline.teacher.loading import load_base_model, load_processor
    from pipeline.teacher.vllm_engine import EngineError, EngineSettings, VllmEngine, convert_checkpoint, worker_python

    try:
        worker_python()
    except EngineError as exc:
        return {"skipped": str(exc)}

    cfg = _demo_world(work)
    rows = split_rows(load_captions(cfg.run_dir / "data" / "captions"), "test")
    pictures = [load_rgb(r["image_path"]) for r in rows[:images]]
    ids = [r["image_id"] for r in rows[:images]]
    threads = cpu_share()
    torch.set_num_threads(threads)
    out: dict = {"images": len(pictures), "max_new_tokens": max_new_tokens, "threads": threads}
    for size, shape in ENGINE_MODELS.items():
        hf_dir, vllm_dir = work / f"{size}-hf", work / f"{size}-vllm"
        build_tiny_llava(hf_dir, TinyTeacher(**shape), [r["caption"] for r in rows], seed=0)
        vllm_dir.mkdir()
        convert_checkpoint(hf_dir, vllm_dir)
        processor = load_processor(hf_dir)
        t0 = time.perf_counter()
        model = load_base_model(hf_dir, precision="fp32").eval()
        hf_start = time.perf_counter() - t0
        kw = dict(seed=0, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
        generate_captions(model, processor, pictures[:2], ids[:2], **kw)  # warm-up
        hf = {}
        for batch in (1, 32):
            t0 = time.perf_counter()
            gens = [g for i in range(0, len(pictures), batch)
                    for g in generate_captions(model, processor, pictures[i: i + batch], ids[i: i + batch], **kw)]
            hf[batch] = (time.perf_counter() - t0, gens)
        parameters = sum(p.numel() for p in model.parameters())
        del model
        settings = EngineSettings(model=str(vllm_dir), dtype="float32", max_model_len=None, max_num_seqs=32,
                                  threads=threads)
        t0 = time.perf_counter()
        with VllmEngine(settings) as engine:
            vllm_start = time.perf_counter() - t0
            prompt = build_prompt(processor)
            engine.generate(pictures[:2], [prompt] * 2, seeds=[None] * 2, temperature=0.0, top_p=1.0,
                            max_tokens=max_new_tokens)  # warm-up
            t0 = time.perf_counter()
            outs = engine.generate(pictures, [prompt] * len(pictures), seeds=[None] * len(pictures),
                                   temperature=0.0, top_p=1.0, max_tokens=max_new_tokens)
            vllm_s = time.perf_counter() - t0
        eos = processor.tokenizer.eos_token_id
        hf_tokens = sum(g.num_tokens for g in hf[32][1])
        vllm_tokens = sum(len(o.token_ids) - (o.token_ids[-1:] == [eos]) for o in outs)
        same = sum(g.caption == clean_caption(o.text) for g, o in zip(hf[32][1], outs))
        out[size] = {"parameters": parameters,
                     "hf_load_s": round(hf_start, 1), "vllm_start_s": round(vllm_start, 1),
                     "hf_b1_images_per_s": round(len(pictures) / hf[1][0], 2),
                     "hf_b32_images_per_s": round(len(pictures) / hf[32][0], 2),
                     "vllm_images_per_s": round(len(pictures) / vllm_s, 2),
                     "hf_b32_tokens_per_s": round(hf_tokens / hf[32][0], 1),
                     "vllm_tokens_per_s": round(vllm_tokens / vllm_s, 1),
                     "vllm_vs_hf_b32": round(hf[32][0] / vllm_s, 2),
                     "greedy_vllm_equal_hf_b32": f"{same}/{len(pictures)}",
                     "greedy_hf_b1_equal_hf_b32": f"{sum(a == b for a, b in zip(hf[1][1], hf[32][1]))}/{len(pictures)}",
                     "new_tokens_hf_vllm": [hf_tokens, vllm_tokens]}
    return out


@bench
def bench_speed(work: Path, *, cfg: Config, settings: SpeedSettings) -> dict:
    """The teacher and every student of the run ``cfg`` names, timed side by side (:mod:`pipeline.inference.speed`)."""
    from pipeline.inference.speed import measure_run, write_speed

    for name in ("onnxscript", "onnx_ir"):  # the ONNX exporter's pass-by-pass INFO lines
        logging.getLogger(name).setLevel(logging.WARNING)
    rd = RunDir(cfg.run_dir)
    speed = measure_run(rd, settings, cfg)
    speed["measured_by"] = 'make bench BENCH_ARGS="--only speed"'
    out = {"speed_json": str(write_speed(rd, speed)), "threads": settings.threads, "images": settings.images}
    for model in speed["models"]:
        out[f"{model['name']} parameters"] = model["parameters"]
        for runtime, rates in model["images_per_s"].items():
            for batch, rate in rates.items():
                out[f"{model['name']} {runtime} b{batch} img/s"] = rate
    return out


@bench
def bench_ngram(work: Path, *, cfg: Config) -> dict:
    """n-gram blocking vs none on the validation split of every student of the run ``cfg`` names."""
    from pipeline.evaluation.bootstrap import describe
    from pipeline.workflows.repetition import blocking_on_validation

    found = blocking_on_validation(cfg)
    out = {"validation images": found["images"], "beam size": found["beam_size"]}
    for name, figures in found["students"].items():
        for n, f in figures.items():
            out[f"{name} n={n}"] = (f"attributes {f['attributes']:.4f}, CIDEr-D {f['CIDEr-D']:.4f}, captions "
                                    "repeating a 2/3/4-gram " + "/".join(f"{v:.3f}" for v in f["repeats"].values()))
    for n, c in found["pooled"].items():
        out[f"pooled n={n} minus off"] = (f"attributes {describe(c['attributes'])}; "
                                          f"CIDEr-D {describe(c['CIDEr-D'])}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated sections")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"),
                        help="speed, ngram: the finished run to measure (its config)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="speed, ngram: dotted config overrides")
    parser.add_argument("--speed-images", type=int, default=64, help="speed: test images each model captions")
    parser.add_argument("--speed-repeats", type=int, default=3, help="speed: timed passes (the median is kept)")
    parser.add_argument("--speed-batch-sizes", default="1,32", help="speed: comma-separated batch sizes")
    parser.add_argument("--speed-threads", type=int, default=None,
                        help="speed: CPU threads for every runtime (default: this process's share of the CPUs)")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("pipeline.inference.speed").setLevel(logging.INFO)  # which model the speed section is timing
    sections = args.only.split(",")
    unknown = [name for name in sections if name not in BENCHES]
    if unknown:
        parser.error(f"--only {','.join(unknown)}: no such section (sections: {', '.join(BENCHES)})")
    options: dict[str, dict] = {}
    if "ngram" in sections:
        try:
            options["ngram"] = {"cfg": load_config(args.config, args.overrides)}
        except PipelineError as exc:
            print(f"bench: error: ngram: {exc}", file=sys.stderr)
            return 1
    try:
        if "speed" in sections:  # check the run first, not after the other sections' minutes
            cfg = load_config(args.config, args.overrides)
            require_run(RunDir(cfg.run_dir))
            settings = SpeedSettings(images=args.speed_images, repeats=args.speed_repeats,
                                     batch_sizes=tuple(int(b) for b in args.speed_batch_sizes.split(",")),
                                     threads=args.speed_threads or cpu_share())
            options["speed"] = {"cfg": cfg, "settings": settings}
    except PipelineError as exc:
        print(f"bench: error: speed: {exc} (or leave the section out: --only "
              f"{','.join(n for n in BENCHES if n != 'speed')})", file=sys.stderr)
        return 1
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for name in sections:
            print(f"== {name}", flush=True)
            results[name] = BENCHES[name](Path(tmp) / name, **options.get(name, {}))
            for k, v in results[name].items():
                print(f"  {k:32s} {v}")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
