"""``python -m tests.killed_stage <log> <watch> <kill_at> <stage> [stage args]`` for test_ownership: runs
``stages.<stage>`` as a user would, watching every file-system change under ``<watch>`` (Python audit events: files
opened for writing, folders made, renames). At each one it checks the ownership invariant (the new entry is already
listed in its folder's marker, or its folder has none) and appends ``event path ok|UNLISTED`` to ``<log>``; at the
``<kill_at>``-th change (0: never) it sends itself SIGKILL before the change happens. Exits with the stage's status.
"""

import json
import os
import runpy
import signal
import sys
from pathlib import Path

from pipeline.core.rundir import MARKER_LOCK, OWNER_FILE

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _target(event: str, args: tuple) -> str | None:
    """The path an audit event creates or writes, or None when it changes nothing."""
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        return os.fsdecode(args[0]) if writes else None
    if event in ("os.mkdir", "os.rename") and isinstance(args[0], (str, bytes, os.PathLike)):
        return os.fsdecode(args[1] if event == "os.rename" else args[0])
    return None


def listed_first(entry: Path) -> bool:
    """Killed right after ``entry`` appears, would its folder still be this pipeline's? Yes when the folder has no
    marker (not an output folder yet, or a temp folder) or its marker lists the entry (or the entry it is a temp of)."""
    try:
        listed = set(json.loads((entry.parent / OWNER_FILE).read_text())["entries"]) | {OWNER_FILE, MARKER_LOCK}
    except FileNotFoundError:
        return True
    return entry.name in listed or any(entry.name.startswith(f".{name}.") for name in listed)


def main() -> None:
    log_path, watch, kill_at, stage = sys.argv[1], os.path.abspath(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 (open for the life of the process)
    state = {"count": 0, "inside": False}

    def hook(event: str, args: tuple) -> None:
        if state["inside"]:
            return
        path = _target(event, args)
        if path is None:
            return
        path = os.path.abspath(path)
        if not path.startswith(watch + os.sep):
            return
        state["inside"] = True
        try:
            state["count"] += 1
            if state["count"] == kill_at:
                log.write(f"killed {event} {path}\n")
                os.kill(os.getpid(), signal.SIGKILL)
            log.write(f"{event} {path} {'ok' if listed_first(Path(path)) else 'UNLISTED'}\n")
        finally:
            state["inside"] = False

    sys.addaudithook(hook)
    sys.argv = [f"stages.{stage}", *sys.argv[5:]]
    runpy.run_module(f"stages.{stage}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
