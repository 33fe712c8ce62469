"""Parallel lanes of stage commands (`make demo --jobs`): balancing, order within a lane, failures."""

import sys
import time

import pytest

from pipeline.errors import PipelineError
from pipeline.lanes import Step, balance, run_lanes


def test_balance_puts_costly_items_on_separate_lanes_and_keeps_order():
    cost = {"attn": 3.0, "vit": 2.0}.get
    lanes = balance(["gru", "attn", "vgg", "vit"], 2, lambda m: cost(m, 1.0))
    assert lanes == [["attn", "vgg"], ["gru", "vit"]]  # loads 4 and 3, each lane in the given order
    assert balance(["a"], 3, lambda m: 1.0) == [["a"]]


def _py(name: str, code: str) -> Step:
    return Step(name, [sys.executable, "-c", code])


def test_lanes_run_side_by_side_with_a_cpu_share_each(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write = "import os, time; time.sleep(1); open(r'{}', 'w').write(os.environ['OMP_NUM_THREADS'])"
    started = time.perf_counter()
    run_lanes([[_py("a", write.format(out / "a"))], [_py("b", write.format(out / "b"))]], tmp_path / "logs", 4)
    assert time.perf_counter() - started < 1.9  # both slept at once
    assert (out / "a").read_text() == (out / "b").read_text() == "2"
    assert (tmp_path / "logs" / "a.log").is_file()


def test_a_failing_step_stops_its_lane_and_names_its_error(tmp_path):
    fail = _py("students gt: x", "import sys; print('students: error: data/x: bad record'); sys.exit(3)")
    never = _py("after", f"open(r'{tmp_path / 'ran'}', 'w')")
    slow = _py("slow", "import time; time.sleep(30)")
    started = time.perf_counter()
    with pytest.raises(PipelineError, match=r"students gt: x failed with exit status 3: students: error: data/x: "
                                            r"bad record \(log: .*students_gt_x\.log\)"):
        run_lanes([[fail, never], [slow]], tmp_path / "logs", 2)
    assert not (tmp_path / "ran").exists()
    assert time.perf_counter() - started < 20  # the other lane's step was terminated
