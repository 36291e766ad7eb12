"""Run folders that never mix two runs' files.

- A new run gets a fresh folder: the default name ``<command>-<dataset>-<model>-<UTC time>`` is claimed with
  an atomic ``mkdir``; when two runs start in the same second the later one gets ``-2``, ``-3``, ...
- A name given with ``--name`` must be new or empty; reusing a folder needs ``--overwrite`` (which first
  deletes the earlier run's files, and refuses a folder holding files fwdgrad does not write) or
  ``--resume`` (which continues the run whose checkpoint is there).
- A lock (``.lock``, held with ``flock`` for the life of the run, so a ``kill -9`` releases it) stops two
  live runs from sharing a folder; taking it also proves the folder writable before any training starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path

try:
    import fcntl
except ModuleNotFoundError:  # pragma: no cover - Windows: the lock is the O_EXCL creation of the file
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
# Everything a run writes; --overwrite deletes these and refuses a folder holding anything else.
RUN_FILES = frozenset({LOCK_FILE, "results.json", "results.md", "checkpoint.pt", "curves_epoch.png",
                       "curves_time.png", "logs", "models", "replay", "tensorboard"})


class RunFolderError(ValueError):
    """The run folder cannot be used (taken, locked, not writable); the message says why and what to do."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "run"


def default_stem(command: str, dataset: str, model: str) -> str:
    """``<command>-<dataset>-<model>-<YYYYmmdd-HHMMSS>`` (UTC), safe as a folder name."""
    return f"{command}-{_slug(dataset)}-{_slug(model)}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


class RunFolder:
    """A claimed and locked run folder; :meth:`release` (or the context manager) drops the lock."""

    def __init__(self, path: Path, lock_fd: int, created: bool = False) -> None:
        self.path = path
        self._fd: int | None = lock_fd
        self._created = created

    @property
    def name(self) -> str:
        return self.path.name

    def release(self) -> None:
        """Remove the lock file and release the lock; a folder this run created and left empty (it failed
        before writing anything, e.g. on missing data) is removed too."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path / LOCK_FILE)
        os.close(self._fd)
        self._fd = None
        if self._created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only succeeds when empty

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock(path: Path) -> int:
    lock = path / LOCK_FILE
    try:
        if fcntl is None:  # pragma: no cover
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        else:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except FileExistsError:  # pragma: no cover
        raise RunFolderError(f"{path} is locked by another run ({lock} exists)") from None
    except OSError as exc:
        raise RunFolderError(f"cannot write to the run folder {path}: {exc.strerror}") from None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            with contextlib.suppress(OSError):
                other = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RunFolderError(f"another live run (pid {other or '?'}) is using {path}; wait for it, or "
                                 "choose another --name") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        raise RunFolderError(f"cannot write to the run folder {path}: {exc.strerror}") from None
    return fd


def _entries(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()} if path.is_dir() else set()


def claim(out_dir: str | Path, name: str | None, stem: str, *, overwrite: bool = False) -> RunFolder:
    """Create and lock the folder of a new run under ``out_dir``: ``name`` if given, else a fresh
    ``stem[-k]``. Raises :class:`RunFolderError` when ``name`` holds another run's files (unless
    ``overwrite``), another live run holds it, or it cannot be written."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"cannot create the output folder {out}: {exc.strerror}") from None
    if name is None:
        for k in range(1, 10_000):
            path = out / (stem if k == 1 else f"{stem}-{k}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise RunFolderError(f"cannot create a run folder in {out}: {exc.strerror}") from None
            return RunFolder(path, _lock(path), created=True)
        raise RunFolderError(f"no free run folder name {stem}-k in {out}")  # pragma: no cover
    path = out / name
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{path} exists and is not a folder")
    try:
        created = not path.exists()
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"cannot create the run folder {path}: {exc.strerror}") from None
    fd = _lock(path)  # before looking at the files: a live run's folder is never touched
    found = _entries(path) - {LOCK_FILE}
    if found and not overwrite:
        os.close(fd)
        raise RunFolderError(f"{path} holds another run's files ({', '.join(sorted(found)[:4])}); use "
                             "--overwrite to replace them, --resume to continue that run, or another --name")
    if found:
        foreign = sorted(found - RUN_FILES)
        if foreign:
            os.close(fd)
            raise RunFolderError(f"--overwrite: {path} holds files fwdgrad does not write ({', '.join(foreign[:4])}); "
                                 "choose another --name")
        for entry in sorted(found):
            p = path / entry
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return RunFolder(path, fd, created=created)


def reopen(path: str | Path) -> RunFolder:
    """Lock an existing run folder to continue its run (``--resume``)."""
    path = Path(path)
    if not path.is_dir():
        raise RunFolderError(f"--resume: no run folder {path}")
    folder = RunFolder(path, _lock(path))
    for tmp in path.rglob(".*.tmp"):  # half-written files of the killed process (never renamed into place)
        with contextlib.suppress(OSError):
            tmp.unlink()
    return folder
