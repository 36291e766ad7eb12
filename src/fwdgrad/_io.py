"""The one atomic file writer of fwdgrad: reports, logs, checkpoints and benchmark results all go through
:func:`write_atomic`, so a reader (or a run killed with ``kill -9``) never sees half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

FILE_MODE = 0o644


def write_atomic(path: str | os.PathLike[str], data: bytes | str, mode: int = FILE_MODE) -> Path:
    """Write ``data`` (``str`` is UTF-8 encoded) to ``path`` atomically and return the path.

    A temporary file in the same folder receives the bytes, is flushed and ``fsync``-ed, gets ``mode``
    (default ``0o644``, readable by everyone like any file a user writes, unlike ``mkstemp``'s ``0o600``),
    then replaces ``path`` with ``os.replace`` (atomic on POSIX and Windows within one file system). Missing
    parent folders are created. On any error the temporary file is removed and ``path`` is unchanged.

    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = write_atomic(pathlib.Path(d) / "a" / "x.txt", "hello")
    ...     (p.read_text(), oct(p.stat().st_mode & 0o777))
    ('hello', '0o644')
    """
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_file(path, mode) as fh:
        fh.write(raw)
    return Path(path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: int = FILE_MODE, *, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """A binary file handle whose bytes replace ``path`` atomically when the ``with`` block ends normally.

    The streaming form of :func:`write_atomic` (same temporary file, ``fsync``, ``mode`` and ``os.replace``),
    for writers that cannot hold the whole file in memory (downloads). An exception raised inside the block
    removes the temporary file and leaves ``path`` unchanged.

    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with atomic_file(pathlib.Path(d) / "y.bin") as fh:
    ...         _ = fh.write(b"ab")
    ...     sorted(p.name for p in pathlib.Path(d).iterdir())
    ['y.bin']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fchmod(fh.fileno(), mode) if hasattr(os, "fchmod") else None
            os.fsync(fh.fileno())
        if not hasattr(os, "fchmod"):  # pragma: no cover - Windows
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
