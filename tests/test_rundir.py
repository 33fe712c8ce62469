import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipeline.core.rundir import (
    MARKER_LOCK,
    OWNER_FILE,
    WORK_STAMP,
    ForeignDataError,
    OutputInUseError,
    StageInputError,
    atomic_write_json,
    atomic_write_text,
    is_up_to_date,
    lock_file,
    output_lock,
    publish_dir,
    read_manifest,
    require_stage,
    reset_work_dir,
    write_manifest,
)
from tests.helpers import ROOT


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_publish_dir_keeps_previous_output_when_interrupted(tmp_path):
    final = tmp_path / "out"
    with publish_dir(final) as tmp:
        (tmp / "f.txt").write_text("v1")
    with pytest.raises(KeyboardInterrupt):
        with publish_dir(final) as tmp:
            (tmp / "f.txt").write_text("half")
            raise KeyboardInterrupt
    assert (final / "f.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in final.iterdir()) == [OWNER_FILE, "f.txt"]


def test_manifest_written_last_controls_skip(tmp_path):
    stage = tmp_path / "stage"
    with pytest.raises(StageInputError, match="run the 'prepare' stage first"):
        require_stage(stage, "prepare")
    stage.mkdir()
    cfg, inputs = {"a": 1}, {"raw": "abc"}
    assert not is_up_to_date(stage, cfg, inputs)
    m = write_manifest(stage, stage="prepare", config=cfg, inputs=inputs, started=time.time() - 2.5,
                       figures={"n": 3})
    assert m["versions"]["torch"] and m["wall_time_s"] == pytest.approx(2.5, abs=1.0)
    assert is_up_to_date(stage, cfg, inputs)
    assert not is_up_to_date(stage, {"a": 2}, inputs)
    assert not is_up_to_date(stage, cfg, {"raw": "changed"})
    assert require_stage(stage, "prepare")["figures"] == {"n": 3}


def test_publish_dir_refuses_what_it_did_not_write(tmp_path):
    final = tmp_path / "out"
    (final / "raw").mkdir(parents=True)
    (final / "raw" / "captions.json").write_text("{}")  # a user's dataset where an output goes
    with pytest.raises(ForeignDataError, match=f"^{final} exists and was not written by fashion-distill"):
        with publish_dir(final):
            pytest.fail("the refusal comes before the temp folder is handed out")
    assert (final / "raw" / "captions.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (final / "raw" / "captions.json").unlink()
    (final / "raw").rmdir()
    with publish_dir(final) as tmp:  # an empty folder is nobody's data
        (tmp / "f.txt").write_text("v1")
    (final / "notes.txt").write_text("mine")  # a file added to an output this pipeline wrote
    with pytest.raises(ForeignDataError, match=f"^{final / 'notes.txt'} was not written by fashion-distill"):
        with publish_dir(final) as tmp:
            pass
    assert (final / "notes.txt").read_text() == "mine" and (final / "f.txt").read_text() == "v1"
    (final / "notes.txt").unlink()
    with publish_dir(final) as tmp:
        (tmp / "g.txt").write_text("v2")
    assert sorted(p.name for p in final.iterdir()) == [OWNER_FILE, "g.txt"]


def test_publish_dir_refuses_a_symlink_or_file_in_the_way(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "file").write_text("x")
    for final in (tmp_path / "link", tmp_path / "file"):
        with pytest.raises(ForeignDataError, match=str(final)):
            with publish_dir(final):
                pass
    assert (tmp_path / "link").is_symlink() and (tmp_path / "file").read_text() == "x"


def test_reset_work_dir_wipes_only_its_own_work(tmp_path):
    work, cfg, inputs = tmp_path / "work", {"a": 1}, {"x": "1"}
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    with pytest.raises(ForeignDataError, match=f"^{work} exists and was not written"):
        reset_work_dir(work, cfg, inputs, force=True)
    assert (work / "thesis.tex").read_text() == "years of work" and not (work / WORK_STAMP).exists()
    (work / "thesis.tex").unlink()
    reset_work_dir(work, cfg, inputs, force=False)
    atomic_write_text(work / "checkpoint", "partial")
    reset_work_dir(work, cfg, inputs, force=False)  # same settings: resumed
    assert (work / "checkpoint").read_text() == "partial"
    write_manifest(work, stage="s", config=cfg, inputs=inputs, started=time.time())
    (work / "notes.txt").write_text("mine")
    with pytest.raises(ForeignDataError, match=f"^{work / 'notes.txt'} was not written"):
        reset_work_dir(work, {"a": 2}, inputs, force=False)
    assert read_manifest(work) is not None and (work / "checkpoint").is_file()
    (work / "notes.txt").unlink()
    reset_work_dir(work, {"a": 2}, inputs, force=False)  # other settings: its own finished output is replaced
    assert sorted(p.name for p in work.iterdir()) == [OWNER_FILE, MARKER_LOCK, WORK_STAMP]


def test_publish_dir_keeps_a_live_process_temp_folder(tmp_path):
    """A second writer never deletes the temp folder of a first one that is still filling it."""
    final = tmp_path / "out"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        host = socket.gethostname()
        mine = tmp_path / f".out.tmp-{live.pid}@{host}-abc"
        leftover = tmp_path / f".out.tmp-{dead.pid}@{host}-def"
        for d in (mine, leftover):
            d.mkdir()
        with publish_dir(final) as tmp:
            (tmp / "f").write_text("x")
        assert mine.is_dir() and not leftover.exists()
    finally:
        live.kill()
        live.wait()


LOCKER = """
import sys, time
from pipeline.core.rundir import OutputInUseError, output_lock
print("trying", flush=True)
try:
    with output_lock(sys.argv[1], wait=sys.argv[2] == "wait"):
        print("locked", time.time(), flush=True)
        time.sleep(float(sys.argv[3]))
except OutputInUseError as exc:
    print(exc, flush=True)
    sys.exit(3)
"""


def _locker(output, mode="nowait", hold=0.0):
    return subprocess.Popen([sys.executable, "-c", LOCKER, str(output), mode, str(hold)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)


def test_lock_names_its_holder_and_is_shared_within_a_process(tmp_path):
    out = tmp_path / "out"
    with output_lock(out) as lock:
        with output_lock(out):  # nested in the same process: the same lock
            pass
        assert lock == lock_file(out) and lock.read_text().startswith(f"process {os.getpid()} on ")
        other = _locker(out)
        (text,) = _said(other)
        assert other.returncode == 3
        assert text.startswith(f"{out} is in use by process {os.getpid()} on {socket.gethostname()} ")
        assert text.endswith("rerun with --wait")
        another = _locker(out / "x")  # another output is free
        assert _said(another)[0].startswith("locked") and another.returncode == 0
    free = _locker(out)
    assert _said(free)[0].startswith("locked") and free.returncode == 0


def test_lock_parts_are_separate(tmp_path):
    out = tmp_path / "distill" / "precise"
    with output_lock(out, part="shard-0-of-2"):
        with output_lock(out, part="shard-1-of-2"):
            assert lock_file(out, "shard-1-of-2").name == ".precise.shard-1-of-2.lock"
        proc = subprocess.run([sys.executable, "-c", LOCKER.replace("output_lock(sys.argv[1]",
                                                                     "output_lock(sys.argv[1], part='shard-0-of-2'"),
                               str(out), "nowait", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 3 and f"{out} (shard-0-of-2) is in use by process {os.getpid()}" in proc.stdout


def _said(proc) -> list[str]:
    """What a locker printed after "trying" (waits for it to end)."""
    lines = proc.communicate(timeout=60)[0].splitlines()
    assert lines[0] == "trying"
    return lines[1:]


def test_wait_blocks_until_the_holder_is_done(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        waiter = _locker(out, "wait")
        assert waiter.stdout.readline().strip() == "trying"
        time.sleep(0.5)
        assert waiter.poll() is None  # still waiting
        released = time.time()
    said = waiter.communicate(timeout=60)[0].strip()
    assert waiter.returncode == 0 and said.startswith("locked") and float(said.split()[1]) >= released


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    holder = _locker(out, hold=120)
    assert holder.stdout.readline().strip() == "trying" and holder.stdout.readline().startswith("locked")
    assert f"process {holder.pid} " in lock_file(out).read_text()
    with pytest.raises(OutputInUseError, match=f"process {holder.pid} "):
        with output_lock(out):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert f"process {holder.pid} " in lock_file(out).read_text()  # the stale lock file is still there
    with output_lock(out):
        assert lock_file(out).read_text().startswith(f"process {os.getpid()} ")


def test_failed_write_names_the_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as err:
        atomic_write_json(target, {"v": 2})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert json.loads(target.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["a.json"]
