"""Each process sizes its torch threads to its share of the CPUs it may use."""

import os

import pytest

from pipeline.core.cpus import cpu_share, usable_cpus


@pytest.mark.parametrize("env, expected", [
    ({}, lambda n: n),
    ({"OMP_NUM_THREADS": "3"}, lambda n: 3),  # an explicit setting wins, even over several ranks
    ({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}, lambda n: 3),
    ({"SLURM_CPUS_PER_TASK": "6"}, lambda n: 6),
    ({"SLURM_CPUS_PER_TASK": "6", "LOCAL_WORLD_SIZE": "4"}, lambda n: 1),
    ({"LOCAL_WORLD_SIZE": "2"}, lambda n: max(1, n // 2)),
    ({"LOCAL_WORLD_SIZE": "64"}, lambda n: 1),  # never zero
    ({"OMP_NUM_THREADS": "", "SLURM_CPUS_PER_TASK": "x"}, lambda n: n),  # unusable values are ignored
])
def test_cpu_share(monkeypatch, env, expected):
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cpu_share(busy=0) == expected(usable_cpus())


def test_cores_busy_with_other_work_are_left_to_it(monkeypatch):
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    n = usable_cpus()
    assert cpu_share(busy=1) == max(1, n - 1) and cpu_share(busy=n + 3) == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert cpu_share(busy=3) == 4  # a Slurm allotment is this job's own


def test_busy_cpus_sees_a_spinning_process():
    import subprocess
    import sys
    import time

    from pipeline.core.cpus import busy_cpus

    if not os.path.exists("/proc/loadavg"):
        pytest.skip("no /proc/loadavg on this platform")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert busy_cpus(samples=9) >= 1
    finally:
        spin.kill()


def test_usable_cpus_follows_the_affinity_mask():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    assert usable_cpus() == len(os.sched_getaffinity(0))


def test_a_stage_process_uses_its_share():
    import subprocess
    import sys

    from tests.helpers import ROOT

    code = ("import torch; from stages.cli import stage_main; "
            "stage_main('probe', lambda cfg, args: print(torch.get_num_threads()), argv=[])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "SLURM_CPUS_PER_TASK": "1"}, capture_output=True,
                         text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "1"


def test_step_environment_sets_threads_and_malloc_thresholds_a_user_setting_wins(monkeypatch):
    from pipeline.core.cpus import MALLOC_TUNABLES, step_environment

    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    env = step_environment(2)
    assert env["OMP_NUM_THREADS"] == "2" and env["GLIBC_TUNABLES"] == MALLOC_TUNABLES
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert step_environment(1)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"


def test_makefile_exports_the_same_malloc_thresholds():
    from pathlib import Path

    from pipeline.core.cpus import MALLOC_TUNABLES

    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert f"export GLIBC_TUNABLES ?= {MALLOC_TUNABLES}\n" in makefile
