"""Run-directory layout, atomic writes and the stage contract (manifest written last, skip when unchanged).

A stage's output folder counts as finished only when its ``manifest.json`` exists; readers go through
:func:`require_stage`, so a half-written folder is never read. Stages that produce one folder in one go publish it
with :func:`publish_dir` (build in a sibling temp folder, then rename into place).

A stage replaces only what it wrote itself: every folder it writes carries a marker (:data:`OWNER_FILE`, listing the
entries it wrote, or the work stamp of a resumable run), and :func:`require_replaceable` refuses anything else in the
way. While it runs, a stage holds :func:`output_lock` on its output, so two runs never write the same folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError

MANIFEST = "manifest.json"
SWEEP_PREFIX = "sweep-"  # the temperature sweep's distilled datasets: kept out of the main chain's sources
OWNER_FILE = ".fashion-distill.json"  # in every folder this pipeline writes: the entries it wrote there
TRACKED_PACKAGES = ("torch", "torchvision", "transformers", "peft", "accelerate", "deepspeed", "datasets",
                    "bitsandbytes", "pycocoevalcap", "fashion-distill")


log = logging.getLogger(__name__)


class StageInputError(PipelineError):
    """An earlier stage's output is missing or unfinished."""


class ForeignDataError(PipelineError):
    """Something this pipeline did not write is where it would write; the message names the path."""


class OutputInUseError(PipelineError):
    """Another live process holds the lock on an output."""


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
        """Names of the finished distilled datasets in this run, sorted; the sweep's own datasets are not listed."""
        base = self.root / "distill"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / MANIFEST).is_file() and not is_sweep_source(p.name))

    @property
    def students(self) -> Path:
        return self.root / "students"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def sweep(self) -> Path:
        """Where `make sweep` writes its points, table, plot and chosen temperature (:mod:`pipeline.sweep`)."""
        return self.root / "sweep"

    @property
    def speed(self) -> Path:
        """Where `make bench BENCH_ARGS="--only speed"` writes the run's timings (:mod:`pipeline.inference.speed`)."""
        return self.root / "speed"

    def output_folders(self) -> tuple[Path, ...]:
        """The folders stages replace as a whole or in parts."""
        return self.data, self.teacher, self.root / "distill", self.students, self.report, self.speed, self.sweep


def is_sweep_source(source: str) -> bool:
    """Whether a caption source (``name`` or ``gt+name``) is one of the temperature sweep's datasets."""
    return source.rpartition("+")[2].startswith(SWEEP_PREFIX)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + fsync + rename.

    An OSError (disk full, read-only folder) names ``path`` when the system did not name a file.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; outputs are as readable as other files
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def _write_owner_file(folder: Path) -> None:
    """Record the entries of ``folder`` as written by this pipeline."""
    entries = sorted({p.name for p in folder.iterdir()} | {OWNER_FILE})
    atomic_write_json(folder / OWNER_FILE, {"written_by": "fashion-distill", "entries": entries})


def foreign_entry(folder: str | Path) -> Path | None:
    """What stands in the way of replacing ``folder``: the folder itself when nothing proves this pipeline wrote it
    (no marker, manifest or work stamp), an entry its marker does not list; None when it may be replaced."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return None
    if folder.is_symlink() or not folder.is_dir():
        return folder
    names = {p.name for p in folder.iterdir()}
    if not names:
        return None
    try:
        allowed = set(json.loads((folder / OWNER_FILE).read_text())["entries"]) | {MANIFEST, WORK_STAMP, OWNER_FILE}
    except (OSError, ValueError, KeyError, TypeError):  # no marker: a manifest or a work stamp proves it
        return None if names & {MANIFEST, WORK_STAMP} else folder
    unknown = sorted(n for n in names - allowed if not (n.startswith(".") and n.endswith(".tmp")))
    return folder / unknown[0] if unknown else None


def require_replaceable(folder: str | Path) -> None:
    """Refuse (naming the path) when ``folder`` holds anything this pipeline did not write."""
    entry = foreign_entry(folder)
    if entry is None:
        return
    if entry == Path(folder):
        raise ForeignDataError(f"{entry} exists and was not written by fashion-distill (no {MANIFEST}); refusing "
                               "to replace it: move it away or choose another run_dir")
    raise ForeignDataError(f"{entry} was not written by fashion-distill; refusing to replace {folder} with it "
                           "inside: move it away")


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _is_leftover(temp: Path, final: Path) -> bool:
    """A temp folder of ``final`` left by a dead process on this host (a live one's is still being filled)."""
    owner, _, _ = temp.name[len(_temp_prefix(final)):].rpartition("-")
    pid, _, host = owner.partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


@contextlib.contextmanager
def publish_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder next to ``final``; on success it replaces ``final`` in one rename.

    A crash leaves only the temp folder (``.name.tmp-*``), which no reader looks at and a later run removes; the
    previous ``final`` (if any) stays intact until the new one is complete. ``final`` must hold only what this
    pipeline wrote (:func:`require_replaceable`); the new folder records its entries in :data:`OWNER_FILE`.
    """
    final = Path(final)
    require_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f"{_temp_prefix(final)}*"):
        if _is_leftover(stale, final):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(final)}{os.getpid()}@{socket.gethostname()}-",
                                dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        _write_owner_file(tmp)
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


# (lock file, thread) -> nesting depth of the locks this process holds; flock is per open file, so another thread
# opens its own and waits like another process would
_HELD: dict[tuple[str, int], int] = {}


def lock_file(output: str | Path, part: str = "") -> Path:
    """The lock file of ``output`` (or of one ``part`` of it, e.g. a shard): beside it, so it outlives replacing."""
    output = Path(output)
    return output.parent / f".{output.name}{'.' + part if part else ''}.lock"


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError):
        if text := path.read_text().strip():
            return text
    return "an unknown process"


@contextlib.contextmanager
def output_lock(output: str | Path, *, part: str = "", wait: bool = False) -> Iterator[Path]:
    """Hold the exclusive lock on ``output`` (or on one ``part`` of it) while the block runs.

    The lock is ``flock`` on :func:`lock_file` with the holder's pid and host written inside; the system drops it
    when the holder dies, so a killed run's lock is simply taken over. Held elsewhere: wait when ``wait``, otherwise
    fail naming the holder. Nested calls in one thread share the lock.
    """
    path = lock_file(output, part)
    key = (os.path.abspath(path), threading.get_ident())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        exc.filename = exc.filename or str(path)
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            where = f"{output}{' (' + part + ')' if part else ''}"
            if not wait:
                raise OutputInUseError(f"{where} is in use by {_holder(path)} (lock {path}); wait for it to "
                                       "finish or rerun with --wait") from None
            log.info("waiting for %s, in use by %s", where, _holder(path))
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        _HELD[key] = 1
        try:
            yield path
        finally:
            del _HELD[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def in_use(output: str | Path) -> bool:
    """Whether a live process holds the lock of ``output`` or of a part of it (:func:`output_lock`)."""
    output = Path(output)
    for path in output.parent.glob(f".{glob.escape(output.name)}*.lock"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
    return False


@contextlib.contextmanager
def claim_output(output: str | Path, *, part: str = "", wait: bool = False) -> Iterator[None]:
    """Lock ``output`` (:func:`output_lock`) and refuse, before anything is written, when something this pipeline
    did not write is in it (:func:`require_replaceable`)."""
    with output_lock(output, part=part, wait=wait):
        require_replaceable(output)
        yield


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
    settings (resume), wipe it on ``force``, a finished output, or other settings. A folder this pipeline did not
    write is refused (:func:`require_replaceable`) before anything is touched."""
    stage_dir = Path(stage_dir)
    require_replaceable(stage_dir)
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
    """Write ``manifest.json`` last: config slice, input fingerprints, versions, wall time and key figures; the
    folder's marker then lists everything in it as written by this stage."""
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
    _write_owner_file(Path(stage_dir))
    return manifest
