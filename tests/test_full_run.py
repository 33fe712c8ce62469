"""docs/full-run.md followed on a fake layout (empty weight files with the right names) as far as the preflight and
a dry-run submission; the preflight's planted problems; the Slurm scripts' resources, names, requeue and throttle;
`make status` on a local run; the `fashion-distill` command."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline.core.config import load_config
from pipeline.core.rundir import output_lock
from pipeline.orchestration.plan import Job, job_state, plan_chain
from pipeline.orchestration.slurm import render_script, resources
from pipeline.workflows.preflight import preflight
from tests.helpers import ROOT, run_stage

FULL = ROOT / "configs" / "deepfashion-13b.yaml"
GUIDE = (ROOT / "docs" / "full-run.md").read_text()
SHARDS = [f"model-0000{i}-of-00006.safetensors" for i in range(1, 7)]


def fake_layout(tmp_path: Path) -> list[str]:
    """What docs/full-run.md tells a user to download, as empty files with the names it gives; the overrides that
    point the full config at it (the guide's `ARGS="key=value"`)."""
    model = tmp_path / "checkpoints" / "llava-1.5-13b-hf"
    model.mkdir(parents=True)
    assert "hf download llava-hf/llava-1.5-13b-hf --local-dir checkpoints/llava-1.5-13b-hf" in GUIDE
    index = {"metadata": {}, "weight_map": {f"layer.{i}.weight": shard for i, shard in enumerate(SHARDS)}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", *SHARDS]:
        (model / name).write_text("{}" if name.endswith(".json") else "")
    data = tmp_path / "data" / "deepfashion-mm"
    (data / "images").mkdir(parents=True)
    captions = {}
    for i in range(12):
        name = f"MEN-Denim-id_{i:08d}-01_7_additional.jpg"
        Image.new("RGB", (8, 12), (10 * i, 0, 0)).save(data / "images" / name)
        captions[name] = "The man wears a short-sleeve shirt with pure color patterns."
    (data / "captions.json").write_text(json.dumps(captions))
    weights = tmp_path / "torch-weights"
    weights.mkdir()
    for name in re.findall(r"\| `([a-z0-9_]+-[0-9a-f]{8}\.pth)` \|", GUIDE):  # the guide's table of file names
        (weights / name).write_bytes(b"")
    return [f"run_dir={tmp_path / 'runs' / 'deepfashion-13b'}", f"data.root={data}", f"teacher.model={model}",
            f"students.encoder.weights_dir={weights}"]


def test_the_guide_on_a_fake_layout_passes_preflight_and_a_dry_run(tmp_path):
    overrides = fake_layout(tmp_path)
    assert preflight(load_config(FULL, overrides)) == []
    res = run_stage("check", "--config", str(FULL), *overrides)
    assert res.returncode == 0 and "preflight: ready" in res.stdout, res.stderr
    res = run_stage("submit", "--config", str(FULL), "--dry-run", *overrides)
    assert res.returncode == 0, res.stderr[-2000:]
    folder = tmp_path / "runs" / "deepfashion-13b" / "slurm"
    scripts = {re.sub(r"^\d\d-|\.sbatch$", "", p.name): p.read_text() for p in folder.glob("*.sbatch")}
    assert set(scripts) >= {"prepare", "finetune", "distill-precise", "merge-creative", "students-gt", "report"}
    for name, script in scripts.items():
        assert f"#SBATCH --job-name=fd-deepfashion-13b-{name}\n" in script
    for name in ("prepare", "reset-precise", "merge-precise", "report"):  # CPU work: no GPU, modest memory
        assert "--gpus" not in scripts[name] and "#SBATCH --mem=32G" in scripts[name], scripts[name]
    for name in ("finetune", "distill-precise", "features", "students-gt"):
        assert "#SBATCH --requeue" in scripts[name] and "#SBATCH --signal=B:USR1@300" in scripts[name]
        assert "trap requeue USR1" in scripts[name]
    assert "#SBATCH --gpus-per-node=8" in scripts["finetune"] and "#SBATCH --cpus-per-task=64" in scripts["finetune"]
    assert "#SBATCH --mem=400G" in scripts["finetune"]
    assert "#SBATCH --gpus-per-node=1" in scripts["distill-precise"] and "#SBATCH --mem=64G" in scripts["students-gt"]
    assert "#SBATCH --array=0-7%8" in scripts["distill-precise"]
    assert "#SBATCH --array=0-3%8" in scripts["students-gt"]


@pytest.mark.parametrize("plant, line", [
    ("data_root", "data.root: {tmp}/nowhere does not exist"),
    ("shard", "teacher.model: {model}/model-00004-of-00006.safetensors missing (named by "
              "model.safetensors.index.json)"),
    ("encoder", "students.encoder.pretrained: {tmp}/torch-weights/resnet101-cd907fc2.pth missing"),
    ("processor", "teacher.model: no processor file in {model}"),
])
def test_preflight_names_each_planted_problem_and_submit_submits_nothing(tmp_path, plant, line):
    overrides = fake_layout(tmp_path)
    model = tmp_path / "checkpoints" / "llava-1.5-13b-hf"
    if plant == "data_root":
        overrides.append(f"data.root={tmp_path / 'nowhere'}")
    elif plant == "shard":
        (model / SHARDS[3]).unlink()
    elif plant == "encoder":
        (tmp_path / "torch-weights" / "resnet101-cd907fc2.pth").unlink()
    else:
        (model / "preprocessor_config.json").unlink()
    expected = line.format(tmp=tmp_path, model=model)
    problems = preflight(load_config(FULL, overrides))
    assert len(problems) == 1 and problems[0].startswith(expected), problems
    res = run_stage("submit", "--config", str(FULL), "--dry-run", *overrides)
    assert res.returncode == 1 and expected in res.stderr and "nothing submitted" in res.stderr
    assert not (tmp_path / "runs" / "deepfashion-13b" / "slurm").exists()  # no script written, nothing submitted
    res = run_stage("check", "--config", str(FULL), *overrides)
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith(expected)


def test_the_demo_config_needs_nothing_downloaded(tmp_path):
    """The demo generates its data, tiny teacher and stand-in weights: nothing for the preflight to miss."""
    assert preflight(load_config(ROOT / "configs" / "demo.yaml", [f"run_dir={tmp_path / 'run'}"])) == []


def test_resources_per_kind_and_job(tmp_path):
    overrides = [*fake_layout(tmp_path), "slurm.cpu_partition=cpu", "slurm.resources.students.time=02:00:00",
                 "slurm.resources.gpu.mem=48G", "slurm.resources.students-gt.gpus=2"]
    cfg = load_config(FULL, overrides)
    jobs = {j.name: j for j in plan_chain(cfg, FULL, overrides, shards=2)}
    got = {n: resources(cfg, jobs[n]) for n in ("prepare", "finetune", "features", "students-gt", "students-precise")}
    assert (got["prepare"].partition, got["prepare"].gpus, got["prepare"].mem) == ("cpu", 0, "32G")
    assert (got["finetune"].partition, got["finetune"].gpus, got["finetune"].cpus) == ("gpu", 8, 64)
    assert (got["features"].mem, got["features"].time) == ("48G", "12:00:00")
    assert (got["students-gt"].gpus, got["students-gt"].mem, got["students-gt"].time) == (2, "48G", "02:00:00")
    assert got["students-precise"].gpus == 1


def test_usr1_stops_the_stage_and_requeues_the_job(tmp_path):
    """The rendered script under bash, with stand-in `python` (a long stage) and `scontrol`: USR1 to the batch
    shell (what --signal=B:USR1@N sends) ends the stage and requeues this array task."""
    cfg = load_config(FULL, [*fake_layout(tmp_path), "slurm.setup=[]"])
    job = Job("students-gt", "students", [], tasks=[["students.archs=[vgg19_gru]"]], kind="gpu")
    script = tmp_path / "job.sbatch"
    script.write_text(render_script(cfg, job, FULL, tmp_path, tmp_path))
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/bash\necho "stage $*" >> {log}\nexec sleep 60\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "scontrol $*" >> {log}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_ARRAY_JOB_ID": "5",
           "SLURM_ARRAY_TASK_ID": "0"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not (log.exists() and "stage" in log.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    started = time.time()
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and time.time() - started < 10, err
    calls = log.read_text().splitlines()
    assert calls[0].startswith("stage -m stages.students") and "students.archs=[vgg19_gru]" in calls[0]
    assert calls[1:] == ["scontrol requeue 5_0"]


def test_status_of_a_local_run(tmp_path):
    """No jobs.json: each job's state from the run folder (missing, then done / stale / running)."""
    from tests.helpers import write_config

    cfg_path = write_config(tmp_path)
    res = run_stage("status", "--config", str(cfg_path))
    assert res.returncode == 0, res.stderr
    rows = {m[1]: m[2] for m in re.finditer(r"^(\S+) +(done|stale|missing|running) ", res.stdout, re.M)}
    assert rows["prepare"] == "missing" and rows["report"] == "missing" and "nothing submitted" in res.stdout
    cfg = load_config(cfg_path)
    prepare = next(j for j in plan_chain(cfg, cfg_path, []) if j.name == "prepare")
    with output_lock(cfg.run_dir / "data"):
        assert job_state(prepare) == "running"
    assert job_state(prepare) == "missing"


def test_status_reads_done_and_stale_from_manifests(tmp_path):
    from pipeline.core.rundir import RunDir, write_manifest
    from pipeline.workflows import depends
    from tests.helpers import write_config

    cfg_path = write_config(tmp_path)
    cfg = load_config(cfg_path)
    raw = cfg.data.root
    (raw / "images").mkdir(parents=True)
    (raw / "captions.json").write_text('{"a.jpg": "a shirt"}')
    (raw / "images" / "a.jpg").write_bytes(b"jpeg")
    write_manifest(RunDir(cfg.run_dir).data, stage="prepare", config=depends.prepare(cfg)[0],
                   inputs=depends.prepare(cfg)[1], started=time.time())
    assert job_state(next(j for j in plan_chain(cfg, cfg_path, []) if j.name == "prepare")) == "done"
    other = load_config(cfg_path, ["seed=3"])
    assert job_state(next(j for j in plan_chain(other, cfg_path, ["seed=3"]) if j.name == "prepare")) == "stale"


def test_fashion_distill_help_lists_the_stages_without_torch():
    code = ("import sys, time; t = time.time(); from stages.main import main; main(['--help']); "
            "print('torch' in sys.modules, round(time.time() - t, 2))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for stage in ("prepare", "finetune", "distill", "students", "report", "check", "submit", "status"):
        assert re.search(rf"^  {stage} +\S", res.stdout, re.M), stage
    torch_loaded, seconds = res.stdout.split()[-2:]
    assert torch_loaded == "False" and float(seconds) < 2
    assert 'fashion-distill = "stages.main:main"' in (ROOT / "pyproject.toml").read_text()


def test_python_m_stages_runs_a_stage_and_print_config_shows_the_effective_config(tmp_path):
    res = subprocess.run([sys.executable, "-m", "stages", "check", "--config", str(FULL), "--print-config",
                          "seed=7", f"run_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    import yaml

    shown = yaml.safe_load(res.stdout)
    assert shown["seed"] == 7 and shown["teacher"]["lora"]["r"] == 64 and shown["slurm"]["array_throttle"] == 8
    res = subprocess.run([sys.executable, "-m", "stages", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "unknown stage 'nope'" in res.stderr


def test_make_alone_prints_help():
    res = subprocess.run(["make", "--no-print-directory", "-n"], cwd=ROOT, capture_output=True, text=True)
    assert "echo" in res.stdout and "Nothing to be done" not in res.stdout
    res = subprocess.run(["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "check" in res.stdout and "submit" in res.stdout and "docs/full-run.md" in res.stdout


def test_export_skips_an_up_to_date_export(tmp_path, capsys):
    from argparse import Namespace

    from stages import export
    from tests.helpers import make_student

    best = make_student(tmp_path / "best", "resnet101_gru")
    args = Namespace(student=str(best), force=False)
    export.run(None, args)
    graphs = {p: p.stat().st_mtime_ns for p in (best / "onnx").iterdir()}
    capsys.readouterr()
    export.run(None, args)
    assert "up to date" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (best / "onnx").iterdir()} == graphs
    export.run(None, Namespace(student=str(best), force=True))
    assert all(p.stat().st_mtime_ns != t for p, t in graphs.items() if p.suffix == ".onnx")
