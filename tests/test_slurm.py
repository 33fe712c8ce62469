"""`make submit` / `make status` against a real single-node Slurm cluster started on 127.0.0.1 for the tests."""

import os
import subprocess
import time

import pytest

from conftest import ROOT, run_stage, write_config
from pipeline.cluster.slurm import job_states
from pipeline.config import load_config
from pipeline.rundir import read_manifest
from test_demo_e2e import TINY

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


def _config(tmp_path, **extra):
    """The e2e test's tiny demo, smaller still: the chain's point here is the scheduling, not the numbers."""
    sections = {**TINY, "slurm": {"gpus_per_node": 0, "cpus_per_task": 1, "distill_shards": 2,
                                  "setup": [f"source {ROOT / '.venv' / 'bin' / 'activate'}"]}}
    sections["data"] = {"synthetic": {"num_images": 80, "image_size": 48}}
    sections["teacher"] = {"train": {**TINY["teacher"]["train"], "epochs": 1, "eval_generation_samples": 2}}
    sections["students"] = {**TINY["students"], "archs": ["vgg19_gru"], "epochs": 1}
    for key, value in extra.items():
        sections[key] = {**sections.get(key, {}), **value} if isinstance(value, dict) else value
    return write_config(tmp_path, **sections)


def _make(target: str, config, env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", target, f"CONFIG={config}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def _wait(cfg, env, timeout=1200) -> dict:
    from pipeline.cluster.slurm import load_jobs

    ids = load_jobs(cfg)
    deadline = time.time() + timeout
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]
    while True:
        states = job_states(ids)
        if not any(s in ACTIVE for tasks in states.values() for _, s in tasks) or time.time() > deadline:
            return states
        time.sleep(3)


def test_dry_run_writes_and_prints_scripts(tmp_path):
    cfg_path = _config(tmp_path)
    res = run_stage("submit", "--config", str(cfg_path), "--dry-run")
    assert res.returncode == 0, res.stderr[-2000:]
    folder = load_config(cfg_path).run_dir / "slurm"
    scripts = {p.name: p.read_text() for p in folder.glob("*.sbatch")}
    assert sorted(scripts) == ["00-prepare.sbatch", "01-finetune.sbatch", "02-distill-precise.sbatch",
                               "03-merge-precise.sbatch", "04-distill-creative.sbatch", "05-merge-creative.sbatch",
                               "06-students.sbatch", "07-report.sbatch"]
    assert "#SBATCH --array=0-1" in scripts["02-distill-precise.sbatch"]
    assert '--shard "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"' in scripts["02-distill-precise.sbatch"]
    assert "#SBATCH --array=0-2" in scripts["06-students.sbatch"]  # 1 arch x 3 sources
    assert "distill.temperature=0.9 distill.name=creative" in scripts["04-distill-creative.sbatch"]
    assert all(s.startswith("#!/bin/bash") and "set -euo pipefail" in s for s in scripts.values())
    assert "#!/bin/bash" in res.stdout and not (folder / "jobs.json").exists()


def test_multinode_finetune_uses_torchrun(tmp_path):
    cfg_path = _config(tmp_path, slurm={"gpus_per_node": 8, "nodes": {"finetune": 2}})
    assert run_stage("submit", "--config", str(cfg_path), "--dry-run").returncode == 0
    script = (load_config(cfg_path).run_dir / "slurm" / "01-finetune.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=8" in script
    assert "torchrun --nnodes=2 --nproc_per_node=8" in script and "--rdzv_backend=c10d" in script


@pytest.mark.slow
def test_chain_runs_to_completion_then_resubmit_skips(tmp_path, slurm):
    cfg_path = _config(tmp_path)
    res = _make("submit", cfg_path, slurm)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    cfg = load_config(cfg_path)
    states = _wait(cfg, slurm)
    bad = {n: t for n, t in states.items() if any(s != "COMPLETED" for _, s in t)}
    logs = "\n".join(p.read_text()[-1500:] for p in (cfg.run_dir / "slurm" / "logs").glob("*.out"))
    assert not bad, f"{bad}\n{logs}"
    assert len(states["students"]) == 3 and len(states["distill-creative"]) == 2
    assert read_manifest(cfg.run_dir / "report")["figures"]["students"] == 3
    status = _make("status", cfg_path, slurm)
    assert status.returncode == 0 and "report" in status.stdout and "COMPLETED" in status.stdout
    again = _make("submit", cfg_path, slurm)
    assert again.returncode == 0 and again.stdout.count("finished, skipped") == 8, again.stdout


@pytest.mark.slow
def test_failed_job_stops_its_dependents(tmp_path, slurm):
    cfg_path = _config(tmp_path, teacher={"model": str(tmp_path / "no-such-llava"), "tiny": None})
    assert _make("submit", cfg_path, slurm).returncode == 0
    cfg = load_config(cfg_path)
    states = _wait(cfg, slurm, timeout=600)
    assert states["prepare"][0][1] == "COMPLETED"
    assert states["finetune"][0][1] == "FAILED"
    for name in ("distill-precise", "merge-precise", "distill-creative", "merge-creative", "students", "report"):
        assert all(s == "CANCELLED" for _, s in states[name]), (name, states[name])
    assert read_manifest(cfg.run_dir / "teacher") is None and not (cfg.run_dir / "distill").exists()
    status = _make("status", cfg_path, slurm)
    assert status.returncode != 0 and "failed or cancelled: finetune" in status.stderr
    log = next((cfg.run_dir / "slurm" / "logs").glob("finetune-*.out")).read_text()
    assert "does not exist" in log  # the one-line reason of the failed stage
