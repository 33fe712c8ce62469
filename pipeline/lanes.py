"""Stage commands in parallel lanes on one machine: how `make demo` uses every core of a laptop.

The demo's models are small, so a second torch thread buys little while a second process doing other work buys
almost 2x. A *lane* is a list of steps (stage command lines) run one after another; the lanes of a phase run side by
side as child processes, each with an equal share of the CPUs (``OMP_NUM_THREADS``, which
:func:`pipeline.cpus.cpu_share` honours). A phase with one lane streams its output to the terminal; with several,
each step writes ``<log_dir>/<step>.log`` and the terminal gets one progress bar and a line per finished step. The
first failing step stops the phase (the other lanes' running steps are terminated; their outputs resume on the
next run, like after a crash) and raises one line naming the step, its last error line and its log.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from pipeline.errors import PipelineError

T = TypeVar("T")

@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]


def stage_step(name: str, stage: str, config: str, overrides: Sequence[str], *extra: str) -> Step:
    """``python -m stages.<stage> --config <config> [overrides] [extra]`` as a step called ``name``."""
    return Step(name, [sys.executable, "-m", f"stages.{stage}", "--config", config, *overrides, *extra])


def balance(items: Sequence[T], lanes: int, cost: Callable[[T], float]) -> list[list[T]]:
    """``items`` spread over at most ``lanes`` lanes (costliest first onto the least loaded one), each lane keeping
    the items' order."""
    loads, out = [0.0] * lanes, [[] for _ in range(lanes)]
    for n in sorted(range(len(items)), key=lambda n: -cost(items[n])):
        lane = loads.index(min(loads))
        out[lane].append(n)
        loads[lane] += cost(items[n])
    return [[items[n] for n in sorted(lane)] for lane in out if lane]


def _log_name(step: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", step).strip("_") + ".log"


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    errors = [ln for ln in lines if ": error:" in ln or ln.startswith(("Traceback", "RuntimeError", "Error"))]
    return (errors or lines or ["no output"])[-1][:300]


class _Phase:
    """One phase's lanes as threads, each running its steps as child processes."""

    def __init__(self, lanes: list[list[Step]], log_dir: Path, threads: int):
        self.lanes, self.log_dir, self.threads = lanes, log_dir, threads
        self.stream = len(lanes) == 1
        self.failed: tuple[Step, int, Path] | None = None
        self.running: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.bar = tqdm(total=sum(map(len, lanes)), desc="demo steps", unit="step", disable=self.stream)

    def _run(self, step: Step) -> None:
        log = self.log_dir / _log_name(step.name)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            out = None if self.stream else stack.enter_context(open(log, "w", encoding="utf-8"))
            with self.lock:
                if self.failed:
                    return
                proc = subprocess.Popen(step.argv, stdout=out, stderr=subprocess.STDOUT if out else None, env=env)
                self.running.add(proc)
            code = proc.wait()
        with self.lock:
            self.running.discard(proc)
            if code and not self.failed:
                self.failed = (step, code, log)
                for other in self.running:
                    other.terminate()
            elif not code:
                self.bar.update()
                self.bar.write(f"{step.name}: done in {time.perf_counter() - started:.0f} s"
                               + ("" if self.stream else f" (log: {log})"))

    def _lane(self, steps: list[Step]) -> None:
        for step in steps:
            if self.failed:
                return
            self._run(step)

    def run(self) -> None:
        workers = [threading.Thread(target=self._lane, args=(lane,), daemon=True) for lane in self.lanes]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        self.bar.close()
        if self.failed:
            step, code, log = self.failed
            where = "" if self.stream else f": {_last_error(log)} (log: {log})"
            raise PipelineError(f"{step.name} failed with exit status {code}{where}")


def run_lanes(lanes: list[list[Step]], log_dir: Path, cpus: int) -> None:
    """Run ``lanes`` side by side, the steps of each in order, sharing ``cpus`` CPUs equally; raise on failure."""
    lanes = [lane for lane in lanes if lane]
    if not lanes:
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    _Phase(lanes, log_dir, max(1, cpus // len(lanes))).run()
