"""How many CPU threads a process should use: its share of the CPUs it may run on.

torch's default (one thread per core of the machine) oversubscribes as soon as anything else runs: a second rank, a
Slurm job sharing the node, the METEOR jar while a student trains. On 2 cores, two torch threads competing with one
busy core trained a small CNN ~20x slower than one thread.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a Slurm/cgroup allotment on Linux; every CPU where that is
    unknown, e.g. macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _positive_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def cpu_share() -> int:
    """Threads for this process: ``OMP_NUM_THREADS`` when set; else Slurm's ``SLURM_CPUS_PER_TASK``; else the usable
    CPUs; divided among the ranks a launcher started on this machine (``LOCAL_WORLD_SIZE``) unless set explicitly."""
    explicit = _positive_int("OMP_NUM_THREADS")
    if explicit:
        return explicit
    cpus = _positive_int("SLURM_CPUS_PER_TASK") or usable_cpus()
    return max(1, cpus // (_positive_int("LOCAL_WORLD_SIZE") or 1))


def set_torch_threads() -> int:
    """Size torch's intra-op thread pool to :func:`cpu_share`; returns the count."""
    import torch

    n = cpu_share()
    torch.set_num_threads(n)
    log.debug("torch threads: %d", n)
    return n
