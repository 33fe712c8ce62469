"""Stage commands on parallel workers (`make demo --jobs`): order, prerequisites, CPU shares, failures."""

import sys
import time

import pytest

from pipeline.errors import PipelineError
from pipeline.scheduler import Step, run_steps


def _py(name: str, code: str, after: tuple[str, ...] = ()) -> Step:
    return Step(name, [sys.executable, "-c", code], after)


def _record(path, name: str, sleep: float = 0.0) -> str:
    """A step that appends ``name, its CPU share, start and end time`` to ``path``."""
    return (f"import os, time; t = time.time(); time.sleep({sleep}); "
            f"open(r'{path}', 'a').write(f\"{name} {{os.environ['OMP_NUM_THREADS']}} {{t}} {{time.time()}}\\n\")")


def test_workers_run_side_by_side_and_wait_for_prerequisites(tmp_path):
    trace = tmp_path / "trace"
    steps = [_py("teacher", _record(trace, "teacher", 1.0)),
             _py("distilled student", _record(trace, "distilled"), after=("teacher",)),
             _py("gt student", _record(trace, "gt", 1.0))]
    run_steps(steps, 2, tmp_path / "logs", 4)
    rows = {name: (share, float(start), float(end)) for name, share, start, end in map(str.split, trace.read_text()
                                                                                      .splitlines())}
    assert {share for share, _, _ in rows.values()} == {"2"}  # 4 CPUs, 2 workers: 2 threads each
    assert rows["gt"][1] < rows["teacher"][2] and rows["teacher"][1] < rows["gt"][2]  # side by side
    assert rows["distilled"][1] >= rows["teacher"][2]  # only after its prerequisite
    assert (tmp_path / "logs" / "distilled_student.log").is_file()


def test_prerequisites_must_be_earlier_steps():
    with pytest.raises(ValueError, match="comes after"):
        run_steps([_py("b", "", after=("a",)), _py("a", "")], 2, None, 2)


def test_a_failing_step_stops_the_run_and_names_its_error(tmp_path):
    fail = _py("student vgg on gt", "import sys; print('students: error: data/x: bad record'); sys.exit(3)")
    never = _py("after", f"open(r'{tmp_path / 'ran'}', 'w')", after=("student vgg on gt",))
    slow = _py("slow", "import time; time.sleep(30)")
    started = time.perf_counter()
    with pytest.raises(PipelineError, match=r"student vgg on gt failed with exit status 3: students: error: data/x: "
                                            r"bad record \(log: .*student_vgg_on_gt\.log\)"):
        run_steps([fail, slow, never], 2, tmp_path / "logs", 2)
    assert not (tmp_path / "ran").exists()
    assert time.perf_counter() - started < 20  # the other worker's step was terminated
