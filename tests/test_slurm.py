"""`make submit` / `make status` against a real single-node Slurm cluster started on 127.0.0.1 for the tests."""

import json
import os
import re
import subprocess
import threading
import time

import pytest

from pipeline.core.config import load_config
from pipeline.core.rundir import RunDir, read_manifest, write_manifest
from pipeline.orchestration.plan import Job, plan_chain
from pipeline.orchestration.slurm import job_states
from pipeline.workflows import depends
from tests.helpers import CHAIN, ROOT, run_stage, slurm_config

STUDENTS = ("students-gt", "students-precise", "students-creative")
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_local.sh"), "start", str(state)],
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        pytest.skip(f"no local Slurm cluster: {res.stderr.strip()[-300:]} (.ci/run installs slurm-wlm and munge)")
    env = {"SLURM_CONF": res.stdout.strip().split("=", 1)[1]}
    yield env
    subprocess.run(["bash", str(ROOT / "scripts" / "slurm_local.sh"), "stop", str(state)], timeout=60)


def _make(target: str, config, env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", target, f"CONFIG={config}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def _wait(cfg, env, timeout=1200) -> dict:
    from pipeline.orchestration.slurm import load_jobs

    ids = load_jobs(cfg)
    deadline = time.time() + timeout
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]
    while True:
        states = job_states(ids)
        if not any(s in ACTIVE for tasks in states.values() for _, s in tasks) or time.time() > deadline:
            return states
        time.sleep(3)


def test_dry_run_writes_and_prints_scripts_and_dag(tmp_path):
    cfg_path = slurm_config(tmp_path)
    res = run_stage("submit", "--config", str(cfg_path), "--dry-run")
    assert res.returncode == 0, res.stderr[-2000:]
    folder = load_config(cfg_path).run_dir / "slurm"
    scripts = {p.name: p.read_text() for p in folder.glob("*.sbatch")}
    assert sorted(scripts) == [f"{i:02d}-{name}.sbatch" for i, name in enumerate(CHAIN)]
    assert "#SBATCH --array=0-1" in scripts["03-distill-precise.sbatch"]
    assert "tasks=('--shard 0/2' '--shard 1/2')" in scripts["03-distill-precise.sbatch"]
    assert '"${task[@]}"' in scripts["03-distill-precise.sbatch"]
    assert "--reset" in scripts["02-reset-precise.sbatch"] and "--merge" in scripts["04-merge-precise.sbatch"]
    assert "#SBATCH --array=0-0" in scripts["09-students-gt.sbatch"]  # 1 arch
    assert "--features-only" in scripts["08-features.sbatch"]
    assert "distill.temperature=0.9 distill.name=creative" in scripts["06-distill-creative.sbatch"]
    assert all(s.startswith("#!/bin/bash") and "set -euo pipefail" in s for s in scripts.values())
    assert "#!/bin/bash" in res.stdout and not (folder / "jobs.json").exists()
    dag = {m[1]: (m[2], m[3]) for m in re.finditer(r"^(\S+) +(\S+)  (.+)$", res.stdout, re.M) if m[1] in CHAIN}
    assert dag["students-precise"] == ("1", "prepare, features, merge-precise")
    assert dag["distill-creative"] == ("2", "reset-creative") and dag["prepare"] == ("-", "-")
    assert {name: [] if after == "-" else after.split(", ") for name, (_, after) in dag.items()} == CHAIN


def test_submit_script_resubmits_the_chain_with_its_dependencies(tmp_path):
    """Run submit.sh against a stand-in sbatch that logs its arguments and answers like `sbatch --parsable`."""
    cfg = load_config(slurm_config(tmp_path))
    from pipeline.orchestration.slurm import write_scripts

    write_scripts(cfg, plan_chain(cfg, tmp_path / "config.yaml", [], shards=2), tmp_path / "config.yaml", ROOT)
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch.log"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/bash\nn=$(( $(cat "$LOG" 2>/dev/null | wc -l) + 100 ))\n'
                                    'echo "$n $*" >> "$LOG"\necho "$n;testcluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    res = subprocess.run(["bash", str(cfg.run_dir / "slurm" / "submit.sh")], capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log)})
    assert res.returncode == 0, res.stderr
    name_of, waits_for = {}, {}
    for line in log.read_text().splitlines():
        job_id, *args = line.split()
        name = re.fullmatch(r"\d\d-(.+)\.sbatch", os.path.basename(args[-1]))[1]
        dependency = [a.split(":")[1:] for a in args if a.startswith("--dependency=afterok:")]
        name_of[job_id], waits_for[name] = name, [name_of[i] for i in (dependency[0] if dependency else [])]
        assert args[0] == "--parsable"
    assert waits_for == CHAIN
    assert res.stdout.split("\n")[-2] == f"report {100 + len(CHAIN) - 1}"
    ids = json.loads((cfg.run_dir / "slurm" / "jobs.json").read_text())  # what `make status` reads
    assert ids == {name: str(100 + i) for i, name in enumerate(CHAIN)} and list(ids) == list(CHAIN)


def _finish(folder, stage: str, key: depends.Depends) -> None:
    write_manifest(folder, stage=stage, config=key[0], inputs=key[1], started=time.time())


@pytest.fixture
def finished_run(tmp_path):
    """A config whose run directory holds every output of the chain, with the manifests its stages would write."""
    cfg_path = slurm_config(tmp_path)
    cfg = load_config(cfg_path)
    (cfg.data.root / "images").mkdir(parents=True)
    (cfg.data.root / "captions.json").write_text('{"a.jpg": "a shirt"}')
    (cfg.data.root / "images" / "a.jpg").write_bytes(b"jpeg")
    cfg.teacher.model.mkdir()
    (cfg.teacher.model / "config.json").write_text("{}")
    rd = RunDir(cfg.run_dir)
    _finish(rd.data, "prepare", depends.prepare(cfg))
    _finish(rd.teacher, "finetune", depends.finetune(cfg, rd))
    for name, temperature in cfg.distill.temperatures.items():
        pinned = load_config(cfg_path, [f"distill.temperature={temperature}", f"distill.name={name}"])
        _finish(rd.distill(name), "distill", depends.distill(pinned, rd))
    for source in ["gt", *cfg.distill.temperatures]:
        _finish(rd.students / f"vgg19_gru__{source}", "students", depends.student(cfg, rd, "vgg19_gru", source))
        (rd.students / f"vgg19_gru__{source}" / "metrics.json").write_text(json.dumps(
            {"arch": "vgg19_gru", "source": source, "test": {}, "attributes": {"macro": 0.5}}))
    _finish(rd.speed, "speed", depends.speed(cfg, rd))
    _finish(rd.report, "report", depends.report(cfg, rd))
    return cfg_path


def _plan(cfg_path, *overrides: str, force: bool = False) -> dict[str, Job]:
    cfg = load_config(cfg_path, overrides)
    return {job.name: job for job in plan_chain(cfg, cfg_path, list(overrides), force=force, shards=2)}


def _submitted(plan: dict[str, Job]) -> set[str]:
    return {name for name, job in plan.items() if not job.done}


def test_resubmission_reruns_exactly_the_jobs_whose_inputs_changed(finished_run):
    assert _submitted(_plan(finished_run)) == set()
    assert _submitted(_plan(finished_run, "report.gallery_size=3")) == {"report"}
    plan = _plan(finished_run, "students.epochs=2")
    assert _submitted(plan) == {"features", *STUDENTS, "speed", "report"}
    assert all(plan[name].tasks == [["students.archs=[vgg19_gru]"]] for name in STUDENTS)
    plan = _plan(finished_run, "distill.temperatures.creative=0.8")
    assert _submitted(plan) == {"reset-creative", "distill-creative", "merge-creative", "features",
                                "students-creative", "speed", "report"}
    assert plan["students-creative"].after == ["prepare", "features", "merge-creative"]
    # a new teacher: its datasets and their students; the ground truth's students stay
    assert _submitted(_plan(finished_run, "teacher.train.epochs=2")) == set(CHAIN) - {"prepare", "students-gt"}
    image = load_config(finished_run).data.root / "images" / "a.jpg"
    image.write_bytes(b"another jpeg")  # the raw data changed: everything reruns
    assert _submitted(_plan(finished_run)) == set(CHAIN)


def test_output_made_with_other_settings_is_not_skipped(finished_run):
    rd = RunDir(load_config(finished_run).run_dir)
    other = load_config(finished_run, ["students.epochs=7"])
    _finish(rd.students / "vgg19_gru__precise", "students", depends.student(other, rd, "vgg19_gru", "precise"))
    plan = _plan(finished_run)
    assert _submitted(plan) == {"features", "students-precise", "speed", "report"}
    plan = _plan(finished_run, "students.epochs=7")  # now the two others are the models made with other settings
    assert _submitted(plan) == {"features", "students-gt", "students-creative", "speed", "report"}


def test_force_reaches_every_job(finished_run):
    plan = _plan(finished_run, force=True)
    assert _submitted(plan) == set(CHAIN)
    for name, job in plan.items():
        # a distill shard gets it through its reset job: a forced shard would wipe its siblings' generations
        assert ("--force" in job.args) == (not name.startswith("distill-")), (name, job.args)


def test_concurrent_feature_cache_writers_compute_once(tmp_path, monkeypatch):
    """Two array tasks asking for the same frozen encoder's features: one computes, the other waits and reads."""
    import numpy as np
    import torch
    from PIL import Image

    from pipeline.core.config import EncoderSettings
    from pipeline.students import features

    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(paths[-1])
    calls, real = [], features.compute_features
    monkeypatch.setattr(features, "compute_features",
                        lambda *a, **k: calls.append(1) or time.sleep(0.5) or real(*a, **k))
    start, results = threading.Barrier(2), []

    def task() -> None:
        start.wait()
        results.append(features.cached_features(tmp_path / "cache", "vgg19", EncoderSettings(width=0.125,
                                                                                            image_size=32), 0, paths))

    threads = [threading.Thread(target=task) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and torch.equal(results[0][0], results[1][0])
    assert [p.suffix for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == [".safetensors"]


def test_multinode_finetune_uses_torchrun(tmp_path):
    cfg_path = slurm_config(tmp_path, slurm={"gpus_per_node": 8, "nodes": {"finetune": 2}})
    assert run_stage("submit", "--config", str(cfg_path), "--dry-run").returncode == 0
    script = (load_config(cfg_path).run_dir / "slurm" / "01-finetune.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=8" in script
    assert "torchrun --nnodes=2 --nproc_per_node=8" in script and "--rdzv_backend=c10d" in script


def test_vllm_distill_tasks_get_their_tensor_parallel_gpus(tmp_path):
    cfg_path = slurm_config(tmp_path, slurm={"gpus_per_node": 8},
                            distill={"engine": "vllm", "vllm": {"tensor_parallel_size": 2}})
    folder = load_config(cfg_path).run_dir / "slurm"
    res = run_stage("submit", "--config", str(cfg_path), "--dry-run")
    assert res.returncode == 0, res.stderr
    scripts = {p.name.split("-", 1)[1]: p.read_text() for p in folder.glob("*.sbatch")}
    assert "#SBATCH --gpus-per-node=2" in scripts["distill-precise.sbatch"]
    assert "#SBATCH --gpus-per-node=1" in scripts["students-gt.sbatch"]


@pytest.mark.slow
def test_chain_runs_to_completion_then_resubmit_skips(tmp_path, slurm):
    cfg_path = slurm_config(tmp_path)
    res = _make("submit", cfg_path, slurm)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    cfg = load_config(cfg_path)
    states = _wait(cfg, slurm)
    bad = {n: t for n, t in states.items() if any(s != "COMPLETED" for _, s in t)}
    logs = "\n".join(p.read_text()[-1500:] for p in (cfg.run_dir / "slurm" / "logs").glob("*.out"))
    assert not bad, f"{bad}\n{logs}"
    assert all(len(states[name]) == 1 for name in STUDENTS) and len(states["distill-creative"]) == 2
    assert read_manifest(cfg.run_dir / "report")["figures"]["students"] == 3
    status = _make("status", cfg_path, slurm)
    assert status.returncode == 0 and "report" in status.stdout and "COMPLETED" in status.stdout
    again = _make("submit", cfg_path, slurm)
    assert again.returncode == 0 and again.stdout.count("finished, skipped") == len(CHAIN), again.stdout

    # another temperature for one dataset: exactly its distill jobs, its student, and the report run again
    kept = {p: read_manifest(p) for p in (cfg.run_dir / "teacher", cfg.run_dir / "distill" / "precise",
                                          cfg.run_dir / "students" / "vgg19_gru__precise")}
    changed = _make("submit", cfg_path, slurm, "ARGS=distill.temperatures.creative=0.8")
    rerun = {"reset-creative", "distill-creative", "merge-creative", "features", "students-creative", "speed",
             "report"}
    assert changed.returncode == 0, changed.stdout[-2000:] + changed.stderr[-2000:]
    assert {n for n in CHAIN if re.search(rf"^{n} +job \d+$", changed.stdout, re.M)} == rerun, changed.stdout
    states = _wait(cfg, slurm)
    assert set(states) == rerun and all(s == "COMPLETED" for t in states.values() for _, s in t), states
    assert read_manifest(cfg.run_dir / "distill" / "creative")["config"]["temperature"] == 0.8
    assert all(read_manifest(p) == manifest for p, manifest in kept.items())


@pytest.mark.slow
def test_failed_job_stops_its_dependents(tmp_path, slurm):
    """A checkpoint complete at submission (the preflight passes) loses its weights before finetune starts: the
    stage's own check on the node fails it, naming the folder, and its dependents never run."""
    model = tmp_path / "llava"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json", "model.safetensors"):
        (model / name).write_text("{}")
    cfg_path = slurm_config(tmp_path, teacher={"model": str(model), "tiny": None})
    assert _make("submit", cfg_path, slurm).returncode == 0
    (model / "model.safetensors").unlink()  # prepare runs first: gone before finetune starts
    cfg = load_config(cfg_path)
    states = _wait(cfg, slurm, timeout=600)
    assert states["prepare"][0][1] == "COMPLETED"
    assert states["finetune"][0][1] == "FAILED"
    for name in ("distill-precise", "merge-precise", "distill-creative", "merge-creative", "students-precise",
                 "speed", "report"):
        assert all(s == "CANCELLED" for _, s in states[name]), (name, states[name])
    assert read_manifest(cfg.run_dir / "teacher") is None and not (cfg.run_dir / "distill").exists()
    status = _make("status", cfg_path, slurm)
    assert status.returncode != 0 and "failed or cancelled: finetune" in status.stderr
    log = next((cfg.run_dir / "slurm" / "logs").glob("finetune-*.out")).read_text()
    assert f"teacher.model: no weights in {model}" in log  # the one-line reason of the failed stage
