"""Run-directory layout, atomic writes and the stage contract (manifest written last, skip when unchanged).

A stage's output folder counts as finished only when its ``manifest.json`` exists; readers go through
:func:`require_stage`, so a half-written folder is never read. Stages that produce one folder in one go publish it
with :func:`publish_dir` (build in a sibling temp folder, then rename into place).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

MANIFEST = "manifest.json"
TRACKED_PACKAGES = ("torch", "torchvision", "transformers", "peft", "accelerate", "deepspeed", "datasets",
                    "bitsandbytes", "pycocoevalcap", "fashion-distill")


class StageInputError(PipelineError):
    """An earlier stage's output is missing or unfinished."""


class RunDir:
    """Paths of every stage's outputs under one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    def distill(self, name: str) -> Path:
        return self.root / "distill" / name

    def distilled_sources(self) -> list[str]:
        """Names of the finished distilled datasets in this run, sorted."""
        base = self.root / "distill"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / MANIFEST).is_file())

    @property
    def students(self) -> Path:
        return self.root / "students"

    @property
    def report(self) -> Path:
        return self.root / "report"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should be as readable as any other file
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def publish_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder next to ``final``; on success it replaces ``final`` in one rename.

    A crash leaves only the temp folder (``.name.tmp-*``), which no reader looks at; the previous ``final`` (if any)
    stays intact until the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_tree(root: str | Path, pattern: str = "*", content: bool = False) -> str:
    """Fingerprint the files under ``root``: names, sizes and mtimes (or full content when ``content``)."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(root.rglob(pattern)):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if content:
            h.update(f"{rel}\0{sha256_file(p)}\n".encode())
        else:
            st = p.stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def library_versions(packages: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def stage_fingerprint(config: dict[str, Any], inputs: dict[str, str]) -> str:
    """What a stage's output depends on: its config slice and its inputs' fingerprints."""
    return fingerprint({"config": config, "inputs": inputs})


def is_up_to_date(stage_dir: str | Path, config: dict[str, Any], inputs: dict[str, str]) -> bool:
    """True when ``stage_dir`` holds a finished output made from exactly this config slice and these inputs."""
    manifest = read_manifest(stage_dir)
    return manifest is not None and manifest.get("fingerprint") == stage_fingerprint(config, inputs)


WORK_STAMP = ".settings"  # fingerprint of the settings that partial (resumable) work in a stage folder belongs to


def is_stale_work(stage_dir: str | Path, config: dict[str, Any], inputs: dict[str, str]) -> bool:
    """True when ``stage_dir`` holds a finished output or partial work made with other settings."""
    stamp = Path(stage_dir) / WORK_STAMP
    return read_manifest(stage_dir) is not None or (stamp.is_file() and
                                                     stamp.read_text() != stage_fingerprint(config, inputs))


def reset_work_dir(stage_dir: str | Path, config: dict[str, Any], inputs: dict[str, str], *, force: bool) -> None:
    """Make ``stage_dir`` the work folder of a resumable run with these settings: keep partial work of the same
    settings (resume), wipe it on ``force``, a finished output, or other settings."""
    stage_dir = Path(stage_dir)
    if force or is_stale_work(stage_dir, config, inputs):
        shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if not (stage_dir / WORK_STAMP).is_file():
        atomic_write_text(stage_dir / WORK_STAMP, stage_fingerprint(config, inputs))


def wait_for_work_dir(stage_dir: str | Path, config: dict[str, Any], inputs: dict[str, str]) -> None:
    """Other ranks of a multi-process run: wait until rank 0 has reset the folder for these settings."""
    stamp, wanted = Path(stage_dir) / WORK_STAMP, stage_fingerprint(config, inputs)
    while not (stamp.is_file() and stamp.read_text() == wanted):
        time.sleep(0.5)


def require_stage(stage_dir: str | Path, stage: str) -> dict[str, Any]:
    """Return the manifest of a finished stage output, or fail naming the folder and the stage to run."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise StageInputError(f"{stage_dir}: no finished '{stage}' output (manifest.json missing); run the "
                              f"'{stage}' stage first")
    return manifest


def write_manifest(stage_dir: str | Path, *, stage: str, config: dict[str, Any], inputs: dict[str, str],
                   started: float, figures: dict[str, Any] | None = None, seed: int | None = None) -> dict[str, Any]:
    """Write ``manifest.json`` last: config slice, input fingerprints, versions, wall time and key figures."""
    manifest = {
        "stage": stage,
        "fingerprint": stage_fingerprint(config, inputs),
        "config": config,
        "inputs": inputs,
        "seed": seed,
        "versions": library_versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_time_s": round(time.time() - started, 3),
        "figures": figures or {},
    }
    atomic_write_json(Path(stage_dir) / MANIFEST, manifest)
    return manifest
