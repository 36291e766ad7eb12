"""The one atomic file writer of fwdgrad: reports, logs, checkpoints and benchmark results all go through
:func:`write_atomic`, so a reader (or a run killed with ``kill -9``) never sees half a file; a write that
fails (a full disk: ``ENOSPC``) raises an ``OSError`` naming the file.

Files that a later command reads back as trusted state — checkpoints, saved models, the initial weights of
a replay log — are written with :func:`save_verified` and read with :func:`load_verified`: a ``torch.save``
dict that carries a format tag and a SHA-256 *content digest* (:func:`content_digest`: the names, types,
dtypes, shapes and bytes of everything in it), so ``torch.load(path, weights_only=True)`` still reads the
file, and a file damaged on disk (flipped bytes in a weight, a truncated copy) is refused by name instead of
resumed or evaluated.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

FILE_MODE = 0o644
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS}


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
    with _naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with _naming(path), os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fchmod(fh.fileno(), mode) if hasattr(os, "fchmod") else None
            os.fsync(fh.fileno())
        if not hasattr(os, "fchmod"):  # pragma: no cover - Windows
            os.chmod(tmp, mode)
        with _naming(path):
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Re-raise a storage ``OSError`` that names no file (``ENOSPC`` from ``write``/``fsync``, a quota, an
    I/O error) as one naming ``path``: ``[Errno 28] No space left on device: 'runs/x/checkpoint.pt'``."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno not in _STORAGE_ERRORS:
            raise
        raise type(exc)(exc.errno, exc.strerror or str(exc), str(path)) from exc


# --- verified files: format tag + content digest -------------------------------------------------------
DIGEST_KEY = "digest"


def content_digest(obj: Any) -> str:
    """``"sha256:<hex>"`` of ``obj``: the type tags, lengths, names, dtypes, shapes and bytes of a tree of
    dicts, lists/tuples, tensors, strings, bytes, numbers, ``None`` (what ``torch.load(weights_only=True)``
    gives back). Equal before ``torch.save`` and after ``torch.load``; a changed byte of any tensor, key or
    value changes it. A top-level ``"digest"`` key is left out (it holds this value).

    >>> import torch
    >>> a = {"w": torch.zeros(2), "lr": 0.1}
    >>> content_digest(a) == content_digest({"w": torch.zeros(2), "lr": 0.1, "digest": "x"})
    True
    >>> content_digest(a) == content_digest({"w": torch.tensor([0.0, 1e-30]), "lr": 0.1})
    False
    """
    h = hashlib.sha256()
    top = {k: v for k, v in obj.items() if k != DIGEST_KEY} if isinstance(obj, Mapping) else obj
    _feed(h, top)
    return "sha256:" + h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    import torch

    if obj is None or isinstance(obj, bool):
        h.update(b"N" if obj is None else (b"T" if obj else b"F"))
    elif isinstance(obj, int):
        text = str(obj).encode()
        h.update(b"i" + struct.pack("<I", len(text)) + text)
    elif isinstance(obj, float):
        h.update(b"f" + struct.pack("<d", obj))
    elif isinstance(obj, str | bytes | bytearray):
        raw = obj.encode("utf-8", "surrogatepass") if isinstance(obj, str) else bytes(obj)
        h.update((b"s" if isinstance(obj, str) else b"b") + struct.pack("<Q", len(raw)) + raw)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"t{t.dtype}{tuple(t.shape)}".encode())
        if t.device.type != "meta" and t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(b"d" + struct.pack("<Q", len(obj)))
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, list | tuple):
        h.update(b"l" + struct.pack("<Q", len(obj)))
        for v in obj:
            _feed(h, v)
    else:  # torch.dtype, torch.device, torch.Size's items, ...: by their text
        text = f"{type(obj).__name__}:{obj!r}".encode()
        h.update(b"o" + struct.pack("<Q", len(text)) + text)


def save_verified(path: str | os.PathLike[str], state: Mapping[str, Any], file_format: str) -> Path:
    """``torch.save`` of ``{**state, "format": file_format, "digest": content_digest(...)}``, atomically
    (:func:`write_atomic`); :func:`load_verified` reads it back. Returns the path.

    >>> import tempfile, pathlib, torch
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = save_verified(pathlib.Path(d) / "m.pt", {"w": torch.ones(3)}, "demo/1")
    ...     load_verified(p, "demo/1")["w"].tolist()
    [1.0, 1.0, 1.0]
    """
    import torch

    body = {**state, "format": file_format}
    body.pop(DIGEST_KEY, None)
    body[DIGEST_KEY] = content_digest(body)
    buf = io.BytesIO()
    torch.save(body, buf)
    return write_atomic(path, buf.getvalue())


def read_torch(path: str | os.PathLike[str], what: str = "torch file") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with one-line ``ValueError``s naming the
    file when it is missing, unreadable, cut short or not a torch file."""
    import torch

    name = repr(str(path))
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise ValueError(f"fwdgrad: no file {name}") from None
    except OSError as exc:
        raise ValueError(f"fwdgrad: cannot read {name}: {exc.strerror or exc}") from None
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling and zip errors come in many types
        raise ValueError(f"fwdgrad: {name} is not a readable {what} (damaged, cut short, or not a torch file: "
                         f"{_first_words(exc)})") from None


def _first_words(exc: Exception) -> str:
    """The telling line of a ``torch.load`` error: the unpickler's own reason when torch wraps it in its
    weights-only advice, else the first line; at most 120 characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1][:120]
    return (lines[0] if lines else type(exc).__name__)[:120]


def check_digest(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """``ValueError`` naming ``path`` unless ``state`` (read from it) matches the digest it records."""
    recorded = state.get(DIGEST_KEY)
    if not isinstance(recorded, str):
        raise ValueError(f"fwdgrad: {str(path)!r} records no content digest (format {state.get('format')!r}), "
                         "so it cannot be verified; write it again with this version of fwdgrad")
    if content_digest(state) != recorded:
        raise ValueError(f"fwdgrad: {str(path)!r} is damaged: its content does not match the digest it was "
                         "written with; restore it from a copy or write it again")


def load_verified(path: str | os.PathLike[str], file_format: str, *, what: str = "fwdgrad file",
                  required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The dict :func:`save_verified` wrote to ``path`` with format tag ``file_format``, its digest checked.

    Raises ``ValueError`` with one line naming the file when it is missing, is not a torch file, is cut
    short, holds another format (a file of an earlier development format, which had no digest, included),
    lacks one of ``required``'s keys, or does not match its content digest (damaged on disk).
    """
    state = read_torch(path, what)
    found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
    if found != file_format:
        raise ValueError(f"fwdgrad: {str(path)!r} is not a {what} of format {file_format!r} (found {found!r})")
    check_digest(path, state)
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"fwdgrad: {str(path)!r} is a {file_format} file without {', '.join(map(repr, missing))}; "
                         "it was not written by fwdgrad, or was altered before its digest was taken")
    return dict(state)
