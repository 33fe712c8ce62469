"""How many CPU threads a process should use: its share of the CPUs it may run on.

torch's default (one thread per core of the machine) oversubscribes as soon as anything else runs: a second rank, a
Slurm job sharing the node, the METEOR jar while a student trains. On 2 cores, two torch threads competing with one
busy core trained a small CNN ~20x slower than one thread, so cores other processes keep busy when a stage starts
are left to them.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)
# glibc's malloc hands every large freed block back to the kernel and maps a fresh one for the next allocation, so a
# CPU training loop that allocates the same big activations each step pays page faults every time: the demo's ResNet
# stand-in spent 43 of its 156 CPU seconds in the kernel, 1 s with these thresholds (same weights). A variable the
# user sets wins; other C libraries ignore it.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=1000000000:glibc.malloc.trim_threshold=1000000000"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a Slurm/cgroup allotment on Linux; every CPU where that is
    unknown, e.g. macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _positive_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def busy_cpus(samples: int = 5) -> int:
    """CPUs other processes keep busy right now: the runnable tasks in ``/proc/loadavg`` besides this one (median
    of a few samples; 0 where that file does not exist)."""
    counts = []
    for _ in range(samples):
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            return 0
        counts.append(max(0, running - 1))
        time.sleep(0.01)
    return sorted(counts)[len(counts) // 2]


def cpu_share(busy: int | None = None) -> int:
    """Threads for this process: ``OMP_NUM_THREADS`` when set; else Slurm's ``SLURM_CPUS_PER_TASK`` (an allotment
    of its own); else the usable CPUs less those other processes keep busy (``busy``, measured when None); divided
    among the ranks a launcher started on this machine (``LOCAL_WORLD_SIZE``)."""
    explicit = _positive_int("OMP_NUM_THREADS")
    if explicit:
        return explicit
    slurm = _positive_int("SLURM_CPUS_PER_TASK")
    if slurm:
        cpus = slurm
    else:
        cpus = max(1, usable_cpus() - (busy_cpus() if busy is None else busy))
    return max(1, cpus // (_positive_int("LOCAL_WORLD_SIZE") or 1))


def set_torch_threads() -> int:
    """Size torch's intra-op thread pool to :func:`cpu_share`; returns the count."""
    import torch

    n = cpu_share()
    torch.set_num_threads(n)
    log.debug("torch threads: %d (of %d usable CPUs)", n, usable_cpus())
    return n


def step_environment(threads: int) -> dict[str, str]:
    """The environment of a child process that may use ``threads`` CPU threads (and glibc's malloc tuned for
    training loops, see ``MALLOC_TUNABLES``)."""
    return {"GLIBC_TUNABLES": MALLOC_TUNABLES, **os.environ, "OMP_NUM_THREADS": str(threads)}


def rank() -> int:
    """This process's rank in a distributed launch (0 when launched alone)."""
    return int(os.environ.get("RANK", "0"))
