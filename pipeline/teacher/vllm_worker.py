"""The vLLM engine's worker process: run by the engine environment's python (``.venv-vllm``), never imported.

It imports only the standard library, PIL and vLLM (its environment has none of the project's dependencies) and
talks JSON lines over a pipe with :class:`pipeline.teacher.vllm_engine.VllmEngine`:

- stdin line 1: the engine settings ``{"model", "dtype", "max_model_len", "max_num_seqs", "tensor_parallel_size",
  "gpu_memory_utilization", "cpu_kv_cache_gb", "threads"}``; the worker starts ``vllm.LLM`` and answers
  ``{"ready": true, "vllm": <version>, "start_s": <s>}``;
- then one line per call ``{"requests": [{"prompt", "image": {"size": [w, h], "rgb": <base64 of raw RGB bytes>},
  "seed", "temperature", "top_p", "max_tokens"}, ...]}``, answered by ``{"outputs": [{"text", "token_ids",
  "finish_reason"}, ...]}`` in request order;
- end of input: the worker exits 0. Any failure: ``{"error": "<one line>"}``, the traceback on stderr, exit 1.

Sampling is seeded per request (``SamplingParams.seed``), so a caption does not depend on what else is in the call.
Library output printed to stdout is moved to stderr so that it cannot corrupt the protocol.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import traceback


def _env(settings: dict) -> None:
    """Engine settings that vLLM reads from the environment, set before it is imported."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process: seconds, not a minute
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.get("cpu_kv_cache_gb", 1)))  # GiB, CPU only
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # no pinning on a shared machine
    os.environ.setdefault("OMP_NUM_THREADS", str(settings.get("threads") or 1))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: a bad path fails at once, naming it


def _image(spec: dict):
    from PIL import Image

    return Image.frombytes("RGB", tuple(spec["size"]), base64.b64decode(spec["rgb"]))


def serve(inp, out) -> None:
    """Answer the settings line and then each call on ``inp`` until its end."""
    settings = json.loads(inp.readline())
    _env(settings)
    started = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    llm = LLM(model=settings["model"], dtype=settings["dtype"], max_model_len=settings["max_model_len"],
              max_num_seqs=settings["max_num_seqs"], tensor_parallel_size=settings["tensor_parallel_size"],
              gpu_memory_utilization=settings["gpu_memory_utilization"], seed=0, limit_mm_per_prompt={"image": 1},
              enforce_eager=current_platform.is_cpu(), disable_log_stats=True,
              # a prompt prefilled over two steps makes vLLM rewind its request's seeded generator, which a CPU
              # generator cannot ("CPU Generator does not use offset"): on CPUs every prompt is prefilled whole
              enable_chunked_prefill=False if current_platform.is_cpu() else None)
    _send(out, {"ready": True, "vllm": vllm.__version__, "start_s": round(time.perf_counter() - started, 2)})
    for line in inp:
        requests = json.loads(line)["requests"]
        prompts = [{"prompt": r["prompt"], "multi_modal_data": {"image": _image(r["image"])}} for r in requests]
        params = [SamplingParams(temperature=r["temperature"], top_p=r["top_p"], max_tokens=r["max_tokens"],
                                 seed=r["seed"], skip_special_tokens=True) for r in requests]
        results = llm.generate(prompts, params, use_tqdm=False)  # in request order
        _send(out, {"outputs": [{"text": c.text, "token_ids": list(c.token_ids), "finish_reason": c.finish_reason}
                                for c in (r.outputs[0] for r in results)]})


def _send(out, message: dict) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def main() -> int:
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")  # the protocol's own copy of stdout
    os.dup2(2, 1)  # anything else written to stdout (library prints, C extensions) goes to stderr
    sys.stdout = sys.stderr
    try:
        serve(sys.stdin, out)
    except BaseException as exc:  # every failure reaches the caller as one line
        traceback.print_exc()
        text = " ".join(str(exc).split()) or "no message"
        _send(out, {"error": f"{type(exc).__name__}: {text[:500]}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
