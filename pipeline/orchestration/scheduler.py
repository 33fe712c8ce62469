"""Stage commands on a few parallel workers of one machine: how `make demo` uses every core of a laptop.

The demo's models are small: a second torch thread buys them little, a second process doing other work almost 2x.
Each :class:`Step` is a command line that may name steps it comes ``after``; ``workers`` threads each take the first
step in list order whose prerequisites have finished and run it as a child process with an equal share of the CPUs
(``OMP_NUM_THREADS``, which :func:`pipeline.core.cpus.cpu_share` honours). So the list is a priority order and the
schedule balances itself (the teacher's chain beside the ground-truth students, each distilled source's students as
soon as its dataset exists). With one worker the steps stream their output to the terminal; with several, each
writes ``<log_dir>/<step>.log`` and the terminal gets a progress bar and a line per finished step. The first failing
step stops the run (running steps are terminated; their outputs resume on the next run, as after a crash) and
raises one line naming the step, its last error line and its log.

A ``python -m <module> ...`` step (every stage step) is not started as a new interpreter but forked from a
``multiprocessing`` forkserver (on Linux) that imported torch, torchvision, transformers and the students' modules
once: the demo's ~17 steps would otherwise each spend ~4 CPU seconds importing them. Any other command runs as a
subprocess.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import re
import runpy
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.core.cpus import MALLOC_TUNABLES, set_torch_threads, step_environment
from pipeline.core.errors import PipelineError
from pipeline.orchestration.plan import Job


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    after: tuple[str, ...] = ()  # names of earlier steps that must finish first


def local_steps(jobs: Sequence[Job], config: str) -> list[Step]:
    """The chain's jobs that run as steps in the same priority order: one per job, one per array task (named after
    its job and the task's last argument's value); a step comes after every step of the jobs its job waits for."""
    names: dict[str, list[str]] = {}
    steps = []
    for job in jobs:
        if job.done:
            continue
        after = tuple(step for name in job.after for step in names.get(name, ()))
        tasks = job.tasks if job.tasks is not None else [[]]
        names[job.name] = []
        for task in tasks:
            name = job.name + (f" {task[-1].split('=')[-1].strip('[]')}" if task else "")
            argv = [sys.executable, "-m", f"stages.{job.stage}", "--config", config, *job.args, *task]
            steps.append(Step(name, argv, after))
            names[job.name].append(name)
    return steps


PRELOAD = ["torch", "torchvision", "transformers", "datasets", "peft", "pipeline.workflows.students",
           "pipeline.evaluation.metrics"]


def _run_module(module: str, args: list[str], env: dict[str, str], log: Path | None) -> None:
    """In a forked child: ``python -m <module> <args>`` with ``env``, its output appended to ``log`` (None: the
    server's). Unlike a new interpreter, it has the server's imports (``PRELOAD``, and the parent's ``__main__``
    module, which multiprocessing re-imports), and atexit handlers do not run: stages close what they open."""
    os.environ.clear()
    os.environ.update(env)
    if "torch" in sys.modules:  # imported by the server, its thread pool sized by the server's environment
        set_torch_threads()
    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    sys.argv = [module, *args]
    sys.modules.pop(module, None)  # imported with the parent's __main__: run it afresh, as `python -m` would
    runpy.run_module(module, run_name="__main__", alter_sys=True)


class _ForkedStage:
    """``python -m <module> ...`` run in a child of the forkserver, with :class:`subprocess.Popen`'s ``wait`` and
    ``terminate``. ``lock`` must be held around every other ``Process.start()``: it polls every child, and two
    threads reading one child's status from the forkserver's pipe would leave one with a false 255."""

    def __init__(self, context, argv: list[str], env: dict[str, str], log: Path | None, lock):
        self.lock = lock
        self.process = context.Process(target=_run_module, args=(argv[2], argv[3:], env, log), daemon=False)
        self.process.start()

    def wait(self) -> int:
        multiprocessing.connection.wait([self.process.sentinel])
        with self.lock:
            self.process.join()
            return self.process.exitcode

    def terminate(self) -> None:
        self.process.terminate()  # a no-op once joined


def _forkserver():
    """The forkserver context module steps start from (Linux only: macOS forks badly once system frameworks are
    loaded); it imports ``PRELOAD`` once, starting with glibc's malloc tuned for training loops (``MALLOC_TUNABLES``,
    read when a process starts). A forkserver something else started first (Python >= 3.14's default start method)
    keeps its own preload: steps still run, importing more."""
    if sys.platform != "linux":
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    os.environ.setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)
    return context


def _runs_module(argv: list[str]) -> bool:
    return len(argv) > 2 and argv[0] == sys.executable and argv[1] == "-m"


def _log_name(step: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", step).strip("_") + ".log"


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    errors = [ln for ln in lines if ": error:" in ln or ln.startswith(("Traceback", "RuntimeError", "Error"))]
    return (errors or lines or ["no output"])[-1][:300]


class _Run:
    def __init__(self, steps: list[Step], workers: int, log_dir: Path, threads: int):
        self.pending, self.workers, self.log_dir, self.threads = list(steps), workers, log_dir, threads
        self.stream = workers == 1
        self.done: set[str] = set()
        self.failed: tuple[Step, int, Path] | None = None
        self.running: set[subprocess.Popen | _ForkedStage] = set()
        self.forkserver = _forkserver() if any(_runs_module(s.argv) for s in steps) else None
        self.cond = threading.Condition()
        self.bar = tqdm(total=len(steps), desc="steps", unit="step", disable=self.stream)

    def _next(self) -> Step | None:
        with self.cond:
            while not self.failed and self.pending:
                ready = next((s for s in self.pending if self.done.issuperset(s.after)), None)
                if ready:
                    self.pending.remove(ready)
                    return ready
                self.cond.wait()
            return None

    def _run(self, step: Step) -> None:
        log = self.log_dir / _log_name(step.name)
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            forked = self.forkserver is not None and _runs_module(step.argv)
            # truncated here for every step: a forked one appends from its child
            out = None if self.stream else stack.enter_context(open(log, "w", encoding="utf-8"))
            with self.cond:
                if self.failed:
                    return
                env = step_environment(self.threads)
                try:
                    if forked:
                        proc = _ForkedStage(self.forkserver, step.argv, env, None if self.stream else log, self.cond)
                    else:
                        proc = subprocess.Popen(step.argv, stdout=out, stderr=subprocess.STDOUT if out else None,
                                                env=env)
                except Exception as exc:  # noqa: BLE001 -- no such program, or the forkserver did not start or died
                    proc, message = None, f"Error: could not start {' '.join(step.argv[:3])}: {exc}"
                    if self.stream:
                        print(message, file=sys.stderr)
                    else:
                        log.write_text(message + "\n", encoding="utf-8")
                else:
                    self.running.add(proc)
            code = proc.wait() if proc else 1
        with self.cond:
            self.running.discard(proc)
            if code and not self.failed:
                self.failed = (step, code, log)
                for other in self.running:
                    other.terminate()
            elif not code:
                self.done.add(step.name)
                self.bar.update()
                self.bar.write(f"{step.name}: done in {time.perf_counter() - started:.0f} s"
                               + ("" if self.stream else f" (log: {log})"))
            self.cond.notify_all()

    def _worker(self) -> None:
        while step := self._next():
            self._run(step)

    def run(self) -> None:
        threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(self.workers)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:  # Ctrl-C: start nothing more, stop what runs (steps resume on the next run)
            with self.cond:
                self.pending.clear()
                for proc in self.running:
                    proc.terminate()
            raise
        self.bar.close()
        if self.failed:
            step, code, log = self.failed
            where = "" if self.stream else f": {_last_error(log)} (log: {log})"
            raise PipelineError(f"{step.name} failed with exit status {code}{where}")


def run_steps(steps: list[Step], workers: int, log_dir: Path, cpus: int) -> None:
    """Run ``steps`` on ``workers`` parallel workers sharing ``cpus`` CPUs equally (each step after the steps it
    names, which must come before it in the list); raise on the first failure."""
    seen: set[str] = set()
    for step in steps:
        if step.name in seen:
            raise ValueError(f"two steps are called {step.name!r}")
        missing = set(step.after) - seen
        if missing:
            raise ValueError(f"step {step.name!r} comes after {sorted(missing)}, which are not earlier steps")
        seen.add(step.name)
    workers = max(1, min(workers, len(steps)))
    if steps:
        log_dir.mkdir(parents=True, exist_ok=True)
        _Run(steps, workers, log_dir, max(1, cpus // workers)).run()
