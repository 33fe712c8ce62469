"""The whole chain (`python -m stages.demo`) on a tiny config, then the report's contents."""

import json
import re
import shutil
import subprocess

import pytest
from PIL import Image

from pipeline.core.config import load_config
from pipeline.core.rundir import read_manifest
from tests.helpers import TINY, run_stage


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from tests.helpers import write_config

    path = write_config(tmp_path_factory.mktemp("demo"), **TINY)
    res = run_stage("demo", "--config", str(path), timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Demo finished" in res.stdout and "report" in res.stdout
    return load_config(path)


VGG = "VGG-family stand-in (width 0.125, 48 px, random weights) + GRU"  # what TINY's students are
VIT = "ViT-family stand-in (width 0.125, 48 px, random weights) + Transformer"


@pytest.mark.slow
def test_every_stage_finished(demo_run):
    run = demo_run.run_dir
    for stage_dir in ("data", "teacher", "distill/precise", "distill/creative", "speed", "report"):
        assert read_manifest(run / stage_dir), stage_dir
    for arch in ("vgg19_gru", "vit_transformer"):
        for source in ("gt", "precise", "creative"):
            assert read_manifest(run / "students" / f"{arch}__{source}"), (arch, source)


@pytest.mark.slow
def test_report_tables_plots_and_gallery(demo_run):
    report = demo_run.run_dir / "report"
    md = (report / "results.md").read_text()
    # the answer first: the teacher, the recommended student and what it buys in speed (the chain's speed step)
    lines = md.splitlines()
    assert lines[:3] == ["# Results", "", "## The answer"]
    assert re.match(r"\*\*Recommended: .*stand-in.* trained on .* captions: [\d.]+× the teacher's throughput at "
                    r"\d+% of its attribute accuracy", lines[4]), lines[4]
    assert "| teacher: tiny-llava, fine-tuned (its precise captions, T=0.2) |" in md.split("All students")[0]
    assert "## What distillation buys" in md and "the chain's quick speed step" in md
    for needle in ("Students trained on the ground truth", "Students trained on teacher captions", "Teacher datasets",
                   VGG, VIT, "constant caption", "precise", "creative", "BLEU-4",
                   "CIDEr-D", "METEOR", "ROUGE-L"):
        assert needle in md, needle
    rows = (report / "results.csv").read_text().splitlines()
    assert rows[0] == ("model,trained on,seeds,BLEU-4,CIDEr-D,METEOR,ROUGE-L,attributes,image withheld: attr. drop,"
                       "image withheld: CIDEr-D drop")
    assert len(rows) == 1 + 2 * 3 + 2 * 3  # students x sources + two baselines per source
    assert "Attribute accuracy per attribute" in md and "majority attributes (baseline)" in md
    attributes = (report / "attributes.csv").read_text().splitlines()
    assert len(attributes) == 1 + 2 * 3 + 1 and attributes[0].startswith("model,gender,sleeve,")
    teacher = (report / "teacher.csv").read_text().splitlines()
    assert teacher[1].startswith("ground truth") and any(r.startswith("creative,0.9") for r in teacher)
    for png in ("metrics.png", "attributes.png", "curves.png", "caption_lengths.png", "speed_quality.png"):
        with Image.open(report / png) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
            assert len(set(im.convert("L").getdata())) > 10, f"{png} looks blank"
    page = (report / "gallery.html").read_text()
    assert page.count('class="card"') == 4
    for label in ("ground truth", "teacher (precise)", "teacher (creative)", f"{VGG} ← gt", f"{VIT} ← creative"):
        assert label in page, label
    # every caption but the ground truth carries its attribute marks: 4 cards x (2 teachers + 6 students)
    assert page.count('<div class="marks">') == 4 * 8 and 'class="mark right"' in page
    assert page.index('class="summary"') < page.index('class="card"') and '<select id="model">' in page
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert ref.startswith("data:image/") or (report / ref).is_file(), ref


@pytest.mark.slow
def test_gallery_renders_in_headless_chromium(demo_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium); .ci/run installs it")
    shot = tmp_path / "gallery.png"
    page = (demo_run.run_dir / "report" / "gallery.html").resolve()
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400", f"--screenshot={shot}",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    with Image.open(shot) as im:
        colours = len(set(im.convert("RGB").resize((200, 280)).getdata()))
    assert colours > 200, "the screenshot is (nearly) blank: images or text did not render"


@pytest.mark.slow
def test_rerun_skips_finished_stages(demo_run):
    before = {p: p.stat().st_mtime_ns for p in demo_run.run_dir.rglob("manifest.json")}
    res = run_stage("demo", "--config", str(demo_run.run_dir.parent / "config.yaml"), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    after = {p: p.stat().st_mtime_ns for p in demo_run.run_dir.rglob("manifest.json")}
    assert before == after
    assert json.loads((demo_run.run_dir / "report" / "manifest.json").read_text())["figures"]["students"] == 6


@pytest.mark.slow
def test_sweep_on_the_demo_then_rerun_trains_nothing_and_the_report_shows_it(demo_run):
    """`make sweep` on the finished demo (one temperature; the ground-truth student is the demo's own)."""
    config = str(demo_run.run_dir.parent / "config.yaml")
    args = ("--config", config, "sweep.temperatures=[0.9]", "sweep.student=vgg19_gru", "sweep.samples_per_image=[1]",
            "sweep.unlabeled=null")
    res = run_stage("sweep", *args, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "vgg19_gru__gt is up to date" in res.stderr  # the demo trained it already
    sweep = demo_run.run_dir / "sweep"
    best = json.loads((sweep / "best.json").read_text())
    records = {r["point"]: r for r in json.loads((sweep / "points.json").read_text())}
    assert best["temperature"] == 0.9 and set(records) == {"gt", "t0.9"}
    metrics = json.loads((demo_run.run_dir / "students" / "vgg19_gru__sweep-t0.9" / "metrics.json").read_text())
    assert records["t0.9"]["test"]["CIDEr-D"] == metrics["test"]["CIDEr-D"]
    assert 0 < records["t0.9"]["val"]["attributes"] <= 1 and records["t0.9"]["teacher"]["distinct_2"] > 0
    before = {p: p.stat().st_mtime_ns for p in demo_run.run_dir.rglob("manifest.json")}
    res = run_stage("sweep", *args, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert before == {p: p.stat().st_mtime_ns for p in demo_run.run_dir.rglob("manifest.json")}
    res = run_stage("report", "--config", config, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    md = (demo_run.run_dir / "report" / "results.md").read_text()
    assert "## Temperature sweep" in md and "**Chosen: T=0.9**" in md and (demo_run.run_dir / "report" /
                                                                         "sweep.png").is_file()
    assert "sweep-t0.9" not in md.split("## Temperature sweep")[0]  # the main tables are the demo's own
