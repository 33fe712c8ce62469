"""Stage commands on parallel workers (`make demo --jobs`): order, prerequisites, CPU shares, failures."""

import sys
import time

import pytest

from pipeline.core.errors import PipelineError
from pipeline.orchestration.scheduler import Step, run_steps


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


@pytest.mark.skipif(sys.platform != "linux", reason="module steps fork from a forkserver on Linux only")
def test_module_steps_fork_from_a_server_that_imported_torch_once(tmp_path):
    """``python -m`` steps (every stage) start without importing torch again, with their CPU share (torch's thread
    pool too, though torch was imported before the share was known) and log; their exit status counts."""
    ok = Step("probe", [sys.executable, "-m", "tests.forked_probe", str(tmp_path / "ok")])
    plain = _py("plain", f"import sys; open(r'{tmp_path / 'plain'}', 'w').write(str('torch' in sys.modules))")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "probe.log").write_text("an earlier run's output\n")
    run_steps([ok, plain], 2, tmp_path / "logs", 6)
    assert (tmp_path / "ok").read_text() == "True 3 3"
    assert (tmp_path / "plain").read_text() == "False"  # a plain command: a new interpreter
    assert (tmp_path / "logs" / "probe.log").read_text().strip() == "probe ran"
    failing = Step("failing probe", [sys.executable, "-m", "tests.forked_probe", str(tmp_path / "bad"), "4"])
    with pytest.raises(PipelineError, match=r"failing probe failed with exit status 4: probe ran"):
        run_steps([failing, _py("other", "")], 2, tmp_path / "logs", 2)
