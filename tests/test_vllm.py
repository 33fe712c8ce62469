"""The vLLM engine (``distill.engine=vllm``) run for real on the CPU, against HF ``generate`` on the same teacher.

The tests that start the engine need its environment (``make vllm-env``, or ``FASHION_DISTILL_VLLM_PYTHON``) and skip,
saying so, where it is absent; CI creates it.
"""

import json
import signal
from argparse import Namespace

import pytest

from pipeline.core.config import ConfigError, load_config
from pipeline.core.rundir import RunDir, is_up_to_date, read_manifest
from pipeline.data.formats import load_captions, split_rows
from pipeline.reporting.cards import front_matter
from pipeline.teacher.distill import generate_shard, parse_shard, read_generations
from pipeline.teacher.vllm_engine import (
    PYTHON_VAR,
    EngineError,
    EngineSettings,
    VllmEngine,
    convert_checkpoint,
    engine_version,
    vllm_key,
)
from pipeline.workflows import depends
from pipeline.workflows.distill import distill_dataset
from stages import caption, finetune
from tests.helpers import kill_stage_when, run_stage, vllm_engine_missing

needs_engine = pytest.mark.skipif(vllm_engine_missing() is not None,
                                  reason=f"no vLLM engine: {vllm_engine_missing()}")
VLLM = "distill.engine=vllm"


@pytest.fixture(scope="module")
def trained(teacher_world):
    """A run whose teacher was fine-tuned (projector, LoRA, lm_head, embeddings) until its captions vary."""
    path = teacher_world("vllm", teacher={"train": {"epochs": 6, "eval_generation_samples": 0}},
                         distill={"max_new_tokens": 40})
    finetune.run(load_config(path), Namespace(force=False))
    return path


def _distill(path, *overrides, force=True, shard=None, merge=False):
    cfg = load_config(path, list(overrides))
    distill_dataset(cfg, shard=parse_shard(shard), merge=merge, force=force)
    return cfg


def _greedy(cfg, rows, out):
    generate_shard(cfg, rows, out, shard=(0, 1), teacher_dir=cfg.run_dir / "teacher", dataset=None)
    return out / "generations.jsonl"


def _dataset(cfg, name):
    ds = load_captions(cfg.run_dir / "distill" / name / "captions")
    return {s: {(r["image_id"], r["sample"]): r["caption"] for r in split_rows(ds, s)} for s in ("train", "val")}


def test_weight_names_become_the_hub_layout_vllm_loads():
    assert vllm_key("vision_tower.encoder.layers.0.mlp.fc1.weight") == \
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert vllm_key("model.vision_tower.embeddings.patch_embedding.weight") == \
        "vision_tower.vision_model.embeddings.patch_embedding.weight"
    assert vllm_key("model.language_model.layers.1.self_attn.q_proj.weight") == \
        "language_model.model.layers.1.self_attn.q_proj.weight"
    assert vllm_key("lm_head.weight") == "language_model.lm_head.weight"
    for kept in ("language_model.model.norm.weight", "multi_modal_projector.linear_1.bias",
                 "vision_tower.vision_model.post_layernorm.weight"):
        assert vllm_key(kept) == kept


def test_llava_family_checkpoints_are_renamed_others_copied(tmp_path):
    from safetensors import safe_open

    from tests import tiny_vlms

    texts = ["the lady wears a long-sleeve shirt with pure color patterns"] * 8
    for family, renamed in (("llava_next", True), ("llava_onevision", True), ("qwen2_vl", False)):
        src, dst = tiny_vlms.build(family, tmp_path / family, texts), tmp_path / f"{family}-served"
        dst.mkdir()
        changed = convert_checkpoint(src, dst)
        with safe_open(dst / "model.safetensors", "pt") as f:
            keys = list(f.keys())
        tower = [k for k in keys if k.startswith("vision_tower.")]
        if renamed:  # vLLM reads the tower under vision_model. (it refused 'vision_tower.embeddings' before)
            assert changed and tower and all(k.startswith("vision_tower.vision_model.") for k in tower), keys[:5]
        else:
            assert changed == 0 and not tower
        assert (dst / "config.json").read_text() == (src / "config.json").read_text()


def test_caption_tokens_leave_out_whichever_end_token_stopped_it(tmp_path):
    from types import SimpleNamespace

    from pipeline.teacher.collator import eos_token_ids
    from pipeline.teacher.engines import VllmCaptionEngine
    from pipeline.teacher.loading import load_generation_config, load_processor
    from tests import tiny_vlms

    folder = tiny_vlms.build("gemma3", tmp_path / "gemma3", ["a lady in a long denim skirt"] * 8)
    processor = load_processor(folder)
    end_of_turn, eos = processor.tokenizer.convert_tokens_to_ids(["<end_of_turn>", "<eos>"])
    ends = eos_token_ids(processor, load_generation_config(folder))
    assert ends == [end_of_turn, eos]  # the generation config's list (vLLM stops at either), then the tokenizer's
    worker = SimpleNamespace(version="a stand-in: only the token count is checked")
    engine = VllmCaptionEngine(worker, processor, ends)
    assert [engine.caption_tokens(t) for t in ([7, 8, end_of_turn], [7, 8, eos], [7, 8, 9], [])] == [2, 2, 3, 0]
    assert VllmCaptionEngine(worker, processor).caption_tokens([7, 8, end_of_turn]) == 3  # tokenizer EOS only


def hf_greedy(model, processor, image, max_new_tokens: int) -> tuple[list[int], int]:
    """HF's greedy tokens for one image, and how many of them lead by more than a near-tie (top two logits over
    1e-3 apart: a near-tie may go either way in another engine's arithmetic)."""
    import torch

    from pipeline.teacher.collator import build_prompt, encode_prompts

    enc = encode_prompts(processor, build_prompt(processor), [image])
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, output_scores=True,
                             return_dict_in_generate=True)
    gaps = [float(top[0] - top[1]) for top in (s[0].topk(2).values for s in out.scores)]
    decided = next((i for i, g in enumerate(gaps) if g < 1e-3), len(gaps))
    return out.sequences[0, enc["input_ids"].shape[1]:].tolist(), decided


@needs_engine
@pytest.mark.slow
@pytest.mark.parametrize("family", ("llava_next", "llava_onevision", "qwen2_5_vl", "idefics3", "smolvlm"))
def test_each_served_family_gives_hf_greedy_tokens(tmp_path, family):
    from PIL import Image

    from pipeline.core.cpus import cpu_share
    from pipeline.teacher.collator import build_prompt
    from pipeline.teacher.loading import load_processor, load_teacher
    from tests import tiny_vlms

    texts = ["the lady wears a long-sleeve shirt with pure color patterns and a long denim skirt"] * 8
    folder = tiny_vlms.build(family, tmp_path / family, texts, wide_heads=True)
    served = tmp_path / "served"
    served.mkdir()
    convert_checkpoint(folder, served)
    processor, model = load_processor(folder), load_teacher(folder, precision="fp32")
    images = [Image.new("RGB", s, (40 * i + 30, 90, 200 - 50 * i)) for i, s in enumerate([(40, 64), (120, 30),
                                                                                            (48, 48)])]
    hf = [hf_greedy(model, processor, im, 8) for im in images]
    engine = VllmEngine(EngineSettings(model=str(served), dtype="float32", max_model_len=1024, max_num_seqs=4,
                                       threads=cpu_share()))
    try:
        outs = engine.generate(images, [build_prompt(processor)] * len(images), seeds=[None] * len(images),
                               temperature=0.0, top_p=1.0, max_tokens=8)
    finally:
        engine.close()
    for (tokens, decided), out in zip(hf, outs):
        assert decided >= 4, (family, tokens, decided)  # most of each caption is decided, or the check says little
        assert out.token_ids[:decided] == tokens[:decided], (family, out.token_ids, tokens)


def test_engine_key_is_checked_and_a_missing_engine_env_is_one_line(make_config, tmp_path):
    with pytest.raises(ConfigError, match="distill.engine"):
        load_config(make_config(), ["distill.engine=tgi"])
    res = run_stage("distill", "--config", str(make_config()), VLLM, env={PYTHON_VAR: str(tmp_path / "nope")})
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and "make vllm-env" in last and str(tmp_path / "nope") in last, res.stderr


@pytest.mark.slow
@needs_engine
def test_greedy_vllm_equals_hf_greedy_and_serves_the_fine_tuned_teacher(trained, tmp_path):
    cfg = load_config(trained, ["distill.temperature=0.0"])
    data = load_captions(cfg.run_dir / "data" / "captions")
    rows = [r for s in ("train", "val", "test") for r in split_rows(data, s)]
    a, b = ({k: (g["caption"], g["num_tokens"], g["truncated"]) for k, g in read_generations(
        _greedy(load_config(trained, ["distill.temperature=0.0", f"distill.engine={e}"]), rows, tmp_path / e)).items()}
        for e in ("hf", "vllm"))
    same = sum(a[k] == b[k] for k in a)
    print(f"greedy vLLM vs HF: {same}/{len(a)} identical (caption, tokens, truncated)")
    assert set(a) == set(b) and same == len(a)
    assert len({c for c, _, _ in a.values()}) >= 3  # the captions depend on the image
    # the served checkpoint is the fine-tuned teacher, not the base: the base model captions otherwise
    base = tmp_path / "base-vllm"
    base.mkdir()
    convert_checkpoint(cfg.teacher.model, base)
    rows = split_rows(data, "test")[:8]
    from pipeline.data.images import load_rgb
    from pipeline.teacher.collator import build_prompt
    from pipeline.teacher.loading import load_processor

    prompt = build_prompt(load_processor(base))
    with VllmEngine(EngineSettings(model=str(base), dtype="float32", max_model_len=512, max_num_seqs=8)) as engine:
        outs = engine.generate([load_rgb(r["image_path"]) for r in rows], [prompt] * len(rows),
                               seeds=[None] * len(rows), temperature=0.0, top_p=1.0, max_tokens=24)
    from pipeline.teacher.generate import clean_caption

    base_captions = [clean_caption(o.text) for o in outs]
    tuned = [b[(r["image_id"], 0)][0] for r in rows]
    assert sum(x != y for x, y in zip(base_captions, tuned)) >= 6, (base_captions, tuned)
    served = cfg.run_dir / "teacher-vllm"
    assert json.loads((served / "teacher-vllm.json").read_text())["teacher"] == read_manifest(
        cfg.run_dir / "teacher")["fingerprint"]
    assert not any(p.name.startswith("teacher-vllm") for p in cfg.teacher.model.iterdir())  # base only read


@pytest.mark.slow
@needs_engine
def test_engine_in_meta_card_and_fingerprint(trained):
    cfg = _distill(trained, "distill.temperature=0.9", "distill.name=creative", VLLM)
    out = cfg.run_dir / "distill" / "creative"
    version = engine_version()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["engine"] == {"name": "vllm", "version": version["version"], "distribution": version["distribution"],
                              "dtype": "float32"}
    assert meta["throughput"]["engine"] == "vllm" and meta["throughput"]["engine_version"] == version["version"]
    card = front_matter((out / "README.md").read_text())
    assert card["engine"]["name"] == "vllm" and f"generated by vllm {version['version']}" in (out / "README.md"
                                                                                             ).read_text()
    assert is_up_to_date(out, *depends.distill(cfg, RunDir(cfg.run_dir)))
    def current(*overrides: str) -> bool:
        other = load_config(trained, ["distill.temperature=0.9", "distill.name=creative", *overrides])
        return is_up_to_date(out, *depends.distill(other, RunDir(other.run_dir)))

    assert current(VLLM) and current(VLLM, "distill.vllm.max_num_seqs=2")  # speed settings are not the data
    assert not current() and not current(VLLM, "distill.vllm.dtype=bfloat16")  # another engine or dtype redoes it


def _samples(cfg, name) -> dict:
    """Every generated caption (kept, rejected or not) of the dataset ``name``, over its shard files."""
    out = {}
    for path in (cfg.run_dir / "distill" / name).glob("generations*.jsonl"):
        out.update({k: g["caption"] for k, g in read_generations(path).items()})
    return out


@pytest.mark.slow
@needs_engine
def test_sampled_vllm_captions_do_not_depend_on_batch_shards_or_kill_9(trained):
    sample = ("distill.temperature=0.9", "distill.samples_per_image=2", VLLM)
    cfg1 = _distill(trained, *sample, "distill.name=v1", "distill.batch_size=1")
    one, dataset = _samples(cfg1, "v1"), _dataset(cfg1, "v1")
    # 160: one call's prompts exceed the engine's token budget per step, so vLLM would split one over two steps and
    # rewind its seeded generator, which fails on CPUs unless every prompt is prefilled whole (vllm_worker.py)
    for batch in (8, 160):
        assert one == _samples(_distill(trained, *sample, f"distill.name=v{batch}", f"distill.batch_size={batch}"),
                               f"v{batch}")
    for i in range(2):
        _distill(trained, *sample, "distill.name=vsh", "distill.batch_size=3", force=False, shard=f"{i}/2")
    sharded = _distill(trained, *sample, "distill.name=vsh", force=False, merge=True)
    assert _samples(sharded, "vsh") == one and _dataset(sharded, "vsh") == dataset
    # sampling took effect, per sample and per seed; and it is not HF's generator
    greedy_cfg = load_config(trained, ["distill.temperature=0.0", VLLM])
    greedy = {i: g["caption"] for (i, _), g in read_generations(_greedy(
        greedy_cfg, split_rows(load_captions(greedy_cfg.run_dir / "data" / "captions"), "train"),
        greedy_cfg.run_dir / "vllm-greedy")).items()}
    assert sum(one[i, j] != c for i, c in greedy.items() for j in (0, 1)) > len(greedy)
    assert sum(one[i, 0] != one[i, 1] for i in greedy) > len(greedy) // 2
    seed5 = _samples(_distill(trained, *sample, "distill.name=vs5", "seed=5"), "vs5")
    assert sum(seed5[k] != c for k, c in one.items()) > len(one) // 2
    hf = _samples(_distill(trained, *sample[:2], "distill.name=hfs"), "hfs")
    assert sum(hf[k] != c for k, c in one.items()) > len(one) // 2  # the same seeds, another generator
    # kill -9 in the middle (the stage and its engine worker), then a rerun resumes to the same dataset
    args = [*sample, "distill.name=vkill", "distill.batch_size=2"]
    cfg = load_config(trained, args)
    jsonl = cfg.run_dir / "distill" / "vkill" / "generations.jsonl"
    kill_stage_when(["stages.distill", "--config", str(trained), *args], lambda: len(read_generations(jsonl)) >= 20)
    partial = len(read_generations(jsonl))
    assert 20 <= partial < len(one) and read_manifest(jsonl.parent) is None
    with open(jsonl, "a") as fh:
        fh.write('{"image_id": "torn')  # a write cut short by the kill
    resumed = _distill(trained, *args, force=False)
    assert _samples(resumed, "vkill") == one and _dataset(resumed, "vkill") == dataset


@pytest.mark.slow
@needs_engine
def test_caption_the_teacher_with_vllm_equals_hf(trained, tmp_path):
    cfg = load_config(trained)
    images = [r["image_path"] for r in split_rows(load_captions(cfg.run_dir / "data" / "captions"), "test")[:6]]
    rows = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / f"{engine}.jsonl"
        caption.run(load_config(trained, [f"distill.engine={engine}"]),
                    Namespace(student="teacher", images=images, out=str(out), beam=None, runtime="torch"))
        rows[engine] = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows["hf"] == rows["vllm"] and any(r["caption"] for r in rows["hf"])


@pytest.mark.slow
@needs_engine
def test_a_bad_checkpoint_or_an_engine_crash_is_one_line(trained, tmp_path):
    cfg = load_config(trained)
    bad = tmp_path / "bad"
    bad.mkdir()
    convert_checkpoint(cfg.run_dir / "teacher-vllm", bad)
    (bad / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(EngineError) as err:
        VllmEngine(EngineSettings(model=str(bad), dtype="float32", max_model_len=512, max_num_seqs=4))
    message = str(err.value)
    assert "\n" not in message and message.startswith("vLLM engine: ") and "its log: " in message, message
    engine = VllmEngine(EngineSettings(model=str(cfg.run_dir / "teacher-vllm"), dtype="float32", max_model_len=512,
                                       max_num_seqs=4))
    engine.proc.send_signal(signal.SIGKILL)  # the engine dies under the caller
    from PIL import Image

    with pytest.raises(EngineError, match=r"exited with status -9") as err:
        engine.generate([Image.new("RGB", (48, 48))], ["USER: <image>\nhi ASSISTANT:"], seeds=[None],
                        temperature=0.0, top_p=1.0, max_tokens=4)
    assert "\n" not in str(err.value)
    # through the stage: a teacher checkpoint vLLM refuses ends in one line, exit status 1
    res = run_stage("distill", "--config", str(trained), VLLM, "distill.name=badrun", "distill.vllm.max_model_len=8")
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and last.startswith("distill: error: vLLM engine: ") and "its log: " in last, res.stderr
