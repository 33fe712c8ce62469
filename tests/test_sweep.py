"""`make sweep`: the choice of temperature on validation, skipping finished points, the report section.

The fast tests run the sweep's own logic on a run whose teacher and students are stand-ins (spies that write what the
distill and students functions write, with their manifests, and count what they train); the slow one runs it for
real on a tiny run.
"""

import json
import time

import pytest

from pipeline.core.archs import ARCHS
from pipeline.core.config import ConfigError, load_config
from pipeline.core.rundir import (
    RunDir,
    atomic_write_json,
    is_up_to_date,
    read_manifest,
    reset_work_dir,
    write_manifest,
)
from pipeline.data.formats import to_hf_dataset
from pipeline.reporting.tables import results_markdown, sweep_report
from pipeline.sweep.points import GT, SAMPLES, TEMPERATURE, UNLABELED, Point, extra_points, first_points
from pipeline.sweep.summary import best_summary, best_temperatures, comparisons, select_best
from pipeline.workflows import depends
from tests.helpers import CHAIN, slurm_config, write_config

SWEEP = {"temperatures": [0.2, 0.9], "samples_per_image": [1], "unlabeled": None}  # whatever the demo config sweeps
CAPTION = "The lady wears a short-sleeve T-shirt with pure color patterns. She wears a long denim skirt."


def _record(kind, temperature, val, test, k=1):
    point = Point(kind, temperature, k)
    return {"point": point.id, "kind": kind, "temperature": temperature, "samples_per_image": k,
            "dataset": point.dataset, "source": point.source, "student": "resnet101_gru",
            "val": {"attributes": val[0], "CIDEr-D": val[1], "BLEU-4": 0.1},
            "test": {"attributes": test[0], "CIDEr-D": test[1], "BLEU-4": 0.1, "METEOR": 0.2, "ROUGE-L": 0.3},
            "teacher": {"distinct_2": 0.1, "length_mean": 20.0, "vs_ground_truth": None}}


def test_best_temperature_is_chosen_on_validation_when_test_disagrees(tmp_path):
    cfg = load_config(write_config(tmp_path, sweep=SWEEP))
    records = [_record(GT, None, (0.90, 1.5), (0.90, 1.5)),  # the ground truth is no candidate
               _record(TEMPERATURE, 0.0, (0.70, 0.8), (0.60, 0.7)),
               _record(TEMPERATURE, 0.5, (0.80, 0.9), (0.70, 0.8)),  # best on validation
               _record(TEMPERATURE, 0.9, (0.75, 1.2), (0.85, 1.3))]  # best on test
    assert select_best(records, "attributes")["temperature"] == 0.5
    assert select_best(records, "CIDEr-D")["temperature"] == 0.9  # validation CIDEr-D picks otherwise
    best = best_summary(records, cfg.sweep)
    assert best["temperature"] == 0.5 and best["validation"] == records[2]["val"]
    assert best["test"] == records[2]["test"]  # reported beside, not chosen on
    tied = [*records[1:3], _record(TEMPERATURE, 0.7, (0.80, 1.0), (0.50, 0.5))]
    assert select_best(tied, "attributes")["temperature"] == 0.7  # same attributes: validation CIDEr-D decides
    same = [_record(TEMPERATURE, t, (0.8, 1.0), (0.5, 0.5)) for t in (0.9, 0.2, 0.5)]
    assert select_best(same, "attributes")["temperature"] == 0.2  # a full tie: the lower temperature


def test_samples_run_at_the_best_temperature_above_zero_and_gains_are_measured(tmp_path):
    cfg = load_config(write_config(tmp_path, sweep=SWEEP))
    records = [_record(GT, None, (0.80, 1.0), (0.78, 0.9)),
               _record(TEMPERATURE, 0.0, (0.85, 1.1), (0.80, 1.0)),
               _record(TEMPERATURE, 0.5, (0.81, 1.0), (0.79, 1.1)),
               _record(TEMPERATURE, 0.9, (0.82, 1.0), (0.77, 0.9))]
    assert best_temperatures(records, cfg.sweep) == (0.0, 0.9)  # greedy samples would all be the same
    assert [p.id for p in extra_points(cfg.sweep.model_copy(update={"unlabeled": tmp_path}), 0.0, 0.9)] == ["t0-u"]
    records += [_record(SAMPLES, 0.9, (0.83, 1.05), (0.80, 0.95), k=3), _record(UNLABELED, 0.0, (0.84, 1.2),
                                                                                (0.81, 1.0))]
    gains = {c["point"]: c for c in comparisons(records)}
    assert gains["t0.9-k3"]["baseline"] == "t0.9" and gains["t0-u"]["baseline"] == "gt"
    assert gains["t0.9-k3"]["gain"]["test"]["attributes"] == pytest.approx(0.80 - 0.77)
    assert gains["t0-u"]["gain"]["val"]["CIDEr-D"] == pytest.approx(1.2 - 1.0)
    best = best_summary(records, cfg.sweep)
    assert best["samples_per_image"]["k"] == 3 and best["samples_temperature"] == 0.9


def test_sweep_config_is_validated(tmp_path):
    path = write_config(tmp_path)
    for override, needle in (("sweep.student=resnet50", "sweep.student"),
                             ("sweep.temperatures=[0.2,0.2]", "lists a value twice"),
                             ("sweep.temperatures=[]", "sweep.temperatures"),
                             ("sweep.temperatures=[-1]", "sweep.temperatures.0"),
                             ("distill.temperatures.sweep-x=0.3", "the temperature sweep's")):
        with pytest.raises(ConfigError, match=needle):
            load_config(path, [override])


def test_arch_names_match_the_students():
    from typing import get_args

    from pipeline.core.config import Arch

    assert set(get_args(Arch)) == set(ARCHS)


# scores the stand-in students get: validation prefers T=0.2, test prefers T=0.9
VAL = {"gt": (0.80, 1.00), "sweep-t0.2": (0.78, 0.95), "sweep-t0.9": (0.70, 0.90), "sweep-t1.2": (0.60, 0.80)}
TEST = {"gt": (0.79, 0.98), "sweep-t0.2": (0.70, 0.80), "sweep-t0.9": (0.75, 0.92), "sweep-t1.2": (0.60, 0.70)}


class Spies:
    """Stand-ins for distill_dataset, run_experiment and score_checkpoint that write what they write (with the
    manifests the real ones write) and count their work."""

    def __init__(self):
        self.generated, self.trained, self.validated = [], [], []

    def distill(self, cfg, *, force=False, wait=False):
        rd = RunDir(cfg.run_dir)
        out, key = rd.distill(cfg.distill.dataset_name), depends.distill(cfg, rd)
        if not force and is_up_to_date(out, *key):
            return out
        self.generated.append(out.name)
        reset_work_dir(out, *key, force=force)  # as the real stage does: its folder, marked as its own
        t, k = cfg.distill.temperature, cfg.distill.samples_per_image
        rows = [{**r, "caption": CAPTION + " " * int(10 * t), "source": out.name} for r in _gt_rows()
                for _ in range(k if r["split"] == "train" else 1)]
        to_hf_dataset(rows).save_to_disk(str(out / "captions"))
        atomic_write_json(out / "diagnostics.json", {
            "distinct_2": 0.01 + t / 10, "length_mean": 20 + t,
            "vs_ground_truth": {"BLEU-4": 0.5 - t / 4, "CIDEr-D": 1 - t / 2, "attributes": {"macro": 0.9 - t / 5}}})
        write_manifest(out, stage="distill", config=key[0], inputs=key[1], started=time.time())
        return out

    def train(self, cfg, rd, *, arch, source, rows, test_rows, scorer, decoder_inputs, force, variant=None):
        out = depends.student_folder(cfg, rd, arch, source, variant=variant)
        key = depends.student(cfg, rd, arch, source)
        if not force and is_up_to_date(out, *key):
            return json.loads((out / "metrics.json").read_text())
        self.trained.append(source + (f"__{variant}" if variant else ""))
        reset_work_dir(out, *key, force=force)
        attributes, cider = TEST[source]
        s = cfg.students  # the optimizer steps train_student runs without early stopping
        steps = min(s.epochs * -(-len(rows["train"]) // s.batch_size), s.max_steps or float("inf"))
        metrics = {"arch": arch, "source": source, "attributes": {"macro": attributes}, "steps": steps,
                   "test": {"BLEU-4": 0.3, "METEOR": 0.3, "ROUGE-L": 0.5, "CIDEr-D": cider},
                   "image_reliance": {"attribute_macro_drop": 0.1}}
        atomic_write_json(out / "metrics.json", metrics)
        atomic_write_json(out / "per_image.json", {"best": _per_image(test_rows, attributes, cider)})
        write_manifest(out, stage="students", config=key[0], inputs=key[1], started=time.time())
        return metrics

    def score(self, folder, rows, scorer, decoder_inputs, beam_size):
        source = folder.parent.name.split("__")[1]
        self.validated.append(source)
        assert {r["split"] for r in rows} == {"val"}  # the ground-truth validation split, never test
        attributes, cider = VAL[source]
        return {"scores": {"BLEU-4": 0.2, "CIDEr-D": cider}, "attributes": {"macro": attributes},
                "per_image": _per_image(rows, attributes, cider)}


def _per_image(rows, attributes, cider):
    """Per-image scores whose means are ``attributes`` and ``cider``, spread a little around them."""
    return {r["image_id"]: {"attributes": attributes + 0.01 * (i % 3 - 1), "CIDEr-D": cider + 0.02 * (i % 3 - 1)}
            for i, r in enumerate(rows)}


class NoScorer:
    def __init__(self, **_):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _gt_rows():
    return [{"image_id": f"{split}-{i}", "image_path": f"/images/{split}-{i}.jpg", "caption": CAPTION,
             "split": split, "source": "gt"} for split, n in (("train", 6), ("val", 3), ("test", 3)) for i in range(n)]


@pytest.fixture
def spied_run(tmp_path, monkeypatch):
    """A run with prepared data and a finished teacher (manifests), the spies in place of the real work."""
    path = write_config(tmp_path, sweep=SWEEP)
    cfg = load_config(path)
    rd = RunDir(cfg.run_dir)
    to_hf_dataset(_gt_rows()).save_to_disk(str(rd.data / "captions"))
    write_manifest(rd.data, stage="prepare", config={}, inputs={}, started=time.time())
    write_manifest(rd.teacher, stage="finetune", config={}, inputs={}, started=time.time())
    spies = Spies()
    monkeypatch.setattr("pipeline.workflows.distill.distill_dataset", spies.distill)
    monkeypatch.setattr("pipeline.workflows.students.run_experiment", spies.train)
    monkeypatch.setattr("pipeline.workflows.students.score_checkpoint", spies.score)
    monkeypatch.setattr("pipeline.evaluation.metrics.CaptionScorer", NoScorer)
    return path, spies


def test_sweep_chooses_on_validation_and_a_rerun_trains_nothing(spied_run):
    from pipeline.workflows.sweep import run_sweep

    path, spies = spied_run
    cfg = load_config(path)
    out = run_sweep(cfg)
    assert spies.generated == ["sweep-t0.2", "sweep-t0.9"]
    assert spies.trained == ["gt", "sweep-t0.2", "sweep-t0.9"] == spies.validated
    best = json.loads((out / "best.json").read_text())
    assert best["temperature"] == 0.2 and best["validation"]["attributes"] == VAL["sweep-t0.2"][0]
    assert best["test"]["CIDEr-D"] == TEST["sweep-t0.2"][1]  # test beside; T=0.9 would have won on test
    records = {r["point"]: r for r in json.loads((out / "points.json").read_text())}
    assert records["t0.9"]["teacher"] == {"distinct_2": pytest.approx(0.1), "length_mean": pytest.approx(20.9),
                                          "vs_ground_truth": {"BLEU-4": pytest.approx(0.275),
                                                              "CIDEr-D": pytest.approx(0.55),
                                                              "attributes": pytest.approx(0.72)}}
    assert records["gt"]["teacher"]["length_mean"] == len(CAPTION.split())
    rows = (out / "sweep.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[2].startswith("t0.2,sweep-t0.2,0.2,1,") and rows[2].endswith(",✓")
    assert (out / "sweep.png").stat().st_size > 10_000 and read_manifest(out)["figures"]["temperature"] == 0.2
    # main-chain listings leave the sweep's datasets and students out
    assert RunDir(cfg.run_dir).distilled_sources() == []

    stamp = (out / "manifest.json").stat().st_mtime_ns
    run_sweep(cfg)  # finished: nothing distilled, trained or measured, nothing rewritten
    assert (spies.generated, spies.trained, spies.validated) == (
        ["sweep-t0.2", "sweep-t0.9"], ["gt", "sweep-t0.2", "sweep-t0.9"], ["gt", "sweep-t0.2", "sweep-t0.9"])
    assert (out / "manifest.json").stat().st_mtime_ns == stamp

    (out / "manifest.json").unlink()  # killed before its summary: the points' records are kept
    run_sweep(cfg)
    assert len(spies.trained) == 3 and len(spies.validated) == 3 and read_manifest(out) is not None

    wider = load_config(path, ["sweep.temperatures=[0.2,0.9,1.2]"])
    run_sweep(wider)  # one more temperature: only its point is distilled and trained
    assert spies.generated[2:] == ["sweep-t1.2"] and spies.trained[3:] == ["sweep-t1.2"]


def test_points_run_one_by_one_then_the_summary_trains_nothing(spied_run):
    """What the Slurm arrays do: each point alone (distil, then train), the summary job last."""
    from pipeline.workflows.sweep import run_point, run_sweep

    path, spies = spied_run
    cfg = load_config(path)
    for point in first_points(cfg.sweep):
        run_point(cfg, point.id, only="distill")
    assert spies.generated == ["sweep-t0.2", "sweep-t0.9"] and spies.trained == []
    for point in first_points(cfg.sweep):
        assert run_point(cfg, point.id, only="train")["point"] == point.id
    run_sweep(cfg)
    assert spies.trained == ["gt", "sweep-t0.2", "sweep-t0.9"] == spies.validated
    assert json.loads((RunDir(cfg.run_dir).sweep / "best.json").read_text())["temperature"] == 0.2


def test_report_gets_the_sweep_section_once_it_is_finished(spied_run):
    from pipeline.workflows.sweep import run_sweep

    path, _ = spied_run
    cfg = load_config(path)
    rd = RunDir(cfg.run_dir)
    assert sweep_report(rd) is None and "sweep" not in depends.report(cfg, rd)[1]
    run_sweep(cfg)
    section = sweep_report(rd)
    md = results_markdown([], {}, [], sweep=section)
    assert "## Temperature sweep" in md and "**Chosen: T=0.2**" in md and "sweep.png" in md
    assert md.count("| t0.") == 2 and "validation attributes" in md
    assert depends.report(cfg, rd)[1]["sweep"] == read_manifest(rd.sweep)["fingerprint"]


def test_submit_plans_the_sweep_as_job_arrays_after_finetune(tmp_path):
    from pipeline.orchestration.plan import plan_chain, waiting_for
    from pipeline.orchestration.slurm import job_command, render_script

    path = slurm_config(tmp_path, slurm={"sweep": True}, sweep=SWEEP)
    cfg = load_config(path)
    jobs = {j.name: j for j in plan_chain(cfg, path, [], shards=2, sweep=True)}
    waits = {name: waiting_for(job, list(jobs.values())) for name, job in jobs.items()}
    assert waits == {**CHAIN, "sweep-distill": ["finetune"], "sweep-train": ["prepare", "sweep-distill"],
                     "sweep": ["sweep-distill", "sweep-train"], "report": [*CHAIN["report"], "sweep"]}
    assert list(jobs)[-5:] == ["sweep-distill", "sweep-train", "sweep", "speed", "report"]
    distill, train = jobs["sweep-distill"], jobs["sweep-train"]
    assert (points(distill), points(train), jobs["sweep"].tasks) == (["t0.2", "t0.9"], ["gt", "t0.2", "t0.9"], None)
    assert "tasks=('--point t0.2' '--point t0.9')" in job_command(cfg, distill, path)
    assert ["--only", "train", "--wait"] == train.args
    assert "#SBATCH --array=0-2" in render_script(cfg, train, path, tmp_path, tmp_path)
    assert job_command(cfg, jobs["sweep"], path) == f"python -m stages.sweep --config {path}"
    assert not any(name.startswith("sweep") for name in (j.name for j in plan_chain(cfg, path, [])))


def test_finished_sweep_points_are_not_resubmitted(spied_run):
    from pipeline.orchestration.plan import plan_sweep
    from pipeline.workflows.sweep import run_sweep

    path, _ = spied_run
    run_sweep(load_config(path))

    def plan(*overrides, finetuned=True, force=False):
        cfg = load_config(path, list(overrides))
        return {j.name: j for j in plan_sweep(cfg, path, list(overrides), prepared=True, finetuned=finetuned,
                                               force=force)}

    assert all(job.done for job in plan().values())
    wider = plan("sweep.temperatures=[0.2,0.9,1.2]")
    assert [name for name, job in wider.items() if not job.done] == ["sweep-distill", "sweep-train", "sweep"]
    assert points(wider["sweep-distill"]) == ["t1.2"] == points(wider["sweep-train"])
    assert plan("students.epochs=3")["sweep-distill"].done and points(plan(
        "students.epochs=3")["sweep-train"]) == ["gt", "t0.2", "t0.9"]  # other student settings: train, not distil
    retaught = plan(finetuned=False)  # the teacher is being trained again: every point
    assert not any(job.done for job in retaught.values()) and points(retaught["sweep-distill"]) == ["t0.2", "t0.9"]
    forced = plan(force=True)
    assert not any(job.done for job in forced.values())
    assert "--force" in forced["sweep-train"].args and "--force" not in forced["sweep"].args


def points(job) -> list[str]:
    """The sweep points of an array job's tasks."""
    return [task[-1] for task in job.tasks]


def test_k3_runs_against_a_k1_control_trained_for_as_many_steps_and_comparisons_carry_intervals(spied_run,
                                                                                                   monkeypatch):
    """sweep.samples_per_image [1, 3]: the k=3 point and its step control (the k=1 dataset, its own student folder)
    run at the best temperature; the records show the control ran as many optimizer steps as k=3 (k=1 alone: fewer);
    every comparison has a paired-bootstrap interval per split and metric, in best.json and the report section."""
    from pipeline.sweep.points import STEPS, extra_ids, step_control
    from pipeline.workflows.sweep import run_sweep

    path, spies = spied_run
    monkeypatch.setitem(VAL, "sweep-t0.2-k3", (0.79, 0.97))
    monkeypatch.setitem(TEST, "sweep-t0.2-k3", (0.74, 0.84))
    overrides = ["sweep.samples_per_image=[1,3]", "students.batch_size=4"]
    cfg = load_config(path, overrides)
    assert extra_ids(cfg.sweep) == ["k3", "k1-as-k3"]
    out = run_sweep(cfg)
    assert spies.trained[3:] == ["sweep-t0.2-k3", "sweep-t0.2__k1-as-k3"]
    assert spies.generated == ["sweep-t0.2", "sweep-t0.9", "sweep-t0.2-k3"]  # the control distils nothing new
    records = {r["point"]: r for r in json.loads((out / "points.json").read_text())}
    k3, control, k1 = records["t0.2-k3"], records["t0.2-k1-as-k3"], records["t0.2"]
    # 6 training images, batches of 4: k=1 2 steps an epoch, k=3 (18 captions) 5; 6 epochs
    assert (k3["steps"], control["steps"], k1["steps"]) == (30, 30, 12)
    assert (control["kind"], control["dataset"], control["samples_per_image"], control["control_of"]) == (
        STEPS, "sweep-t0.2", 1, "t0.2-k3")
    students = RunDir(cfg.run_dir).students
    settings = read_manifest(students / "resnet101_gru__sweep-t0.2__k1-as-k3")["config"]["students"]
    assert (settings["max_steps"], settings["epochs"], settings["val_every_steps"]) == (30, 15, 15)
    assert "max_steps" not in read_manifest(students / "resnet101_gru__sweep-t0.2")["config"]["students"]
    assert step_control(cfg, 18, 6).students.max_steps == 30 and "per_image" not in k3
    assert "per_image" in json.loads((out / "points" / "t0.2-k3.json").read_text())

    best = json.loads((out / "best.json").read_text())
    found = {(c["point"], c["baseline"]): c for c in best["comparisons"]}
    assert set(found) == {("t0.2-k3", "t0.2"), ("t0.2-k3", "t0.2-k1-as-k3"), ("t0.2-k1-as-k3", "t0.2")}
    assert found["t0.2-k3", "t0.2-k1-as-k3"]["what"] == (
        "k=3 vs k=1 trained for as many optimizer steps (30 vs 30) at T=0.2")
    for c in found.values():
        for split in ("val", "test"):
            for metric in ("attributes", "CIDEr-D"):
                interval = c["intervals"][split][metric]
                assert interval["low"] <= interval["difference"] <= interval["high"]
                assert interval["difference"] == pytest.approx(c["gain"][split][metric])
                assert interval["significant"] == (interval["low"] > 0 or interval["high"] < 0)
    # the same per-image spread on both sides: the difference is the same on every image, the interval a point
    assert found["t0.2-k3", "t0.2-k1-as-k3"]["intervals"]["test"]["CIDEr-D"]["low"] == pytest.approx(0.84 - 0.80)
    section = sweep_report(RunDir(cfg.run_dir)).markdown
    row = next(line for line in section.splitlines() if "as many optimizer steps" in line)
    assert "| +0.040 [+0.040, +0.040] significant |" in row and "95% paired-bootstrap interval" in section
    trained = list(spies.trained)
    run_sweep(load_config(path, overrides))  # finished: nothing trained again
    assert spies.trained == trained
    from pipeline.orchestration.plan import plan_sweep

    jobs = plan_sweep(cfg, path, overrides, prepared=True, finetuned=True, force=False)
    assert all(job.done for job in jobs) and "sweep-extra-train" in [job.name for job in jobs]
    (RunDir(cfg.run_dir).students / "resnet101_gru__sweep-t0.2__k1-as-k3" / "manifest.json").unlink()
    todo = {job.name: job for job in plan_sweep(cfg, path, overrides, prepared=True, finetuned=True, force=False)
            if not job.done}
    assert list(todo) == ["sweep-extra-train", "sweep"] and points(todo["sweep-extra-train"]) == ["k1-as-k3"]


def test_a_step_control_trains_as_many_steps_as_its_k_point_validating_at_the_same_steps(tmp_path):
    """For real (train_student on toy features): k=3's 30 captions and its control's 10 captions under step_control
    run the same optimizer steps and validate at the same steps; the 10 captions alone run fewer."""
    import torch

    from pipeline.evaluation.metrics import CaptionScorer
    from pipeline.students.train import train_student
    from pipeline.students.vocab import Vocabulary
    from pipeline.sweep.points import step_control

    cfg = load_config(write_config(tmp_path, students={"batch_size": 4, "epochs": 2, "val_every_epochs": 1,
                                                       "embed_dim": 8, "hidden_dim": 16, "max_length": 20,
                                                       "min_word_count": 1}))
    words = CAPTION.lower().split()
    one = [" ".join(words[i:] + words[:i]) for i in range(10)]
    val = one[:4]
    features = {"train": torch.randn(30, 8), "val": torch.randn(4, 8)}
    vocab = Vocabulary.build(one, 1)
    runs = {}
    with CaptionScorer(meteor=False) as scorer:
        for name, captions, settings in (("k3", one * 3, cfg.students), ("k1", one, cfg.students),
                                         ("control", one, step_control(cfg, 30, 10).students)):
            runs[name] = train_student("vgg19_gru", settings, lambda split, idx: features[split][idx], 8,
                                       {"train": captions, "val": val}, vocab, tmp_path / name, 0, scorer)
    steps = {name: (r["steps"], [s for s, _ in r["curves"]["val_cider"]]) for name, r in runs.items()}
    assert steps == {"k3": (16, [8, 16]), "k1": (6, [3, 6]), "control": (16, [8, 16])}
