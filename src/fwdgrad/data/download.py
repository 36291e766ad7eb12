"""Checksum-verified, atomic downloads and safe tar extraction.

``download_file`` streams a URL into a temporary file in the destination folder, checks the byte count
announced by the server and the md5 (computed while the bytes stream in), flushes it to disk and only
then renames it onto the destination (``os.replace``, atomic on POSIX and Windows), readable by all
(0644), through :func:`fwdgrad._io.atomic_file`, the streaming form of the package's one atomic writer.
On any failure the temporary file is removed, so the destination either holds a verified file or nothing
at all. A download larger than ``max_bytes`` (1 GiB by default; CIFAR-10's tarball, the largest
official file, is 170,498,071 bytes) is refused as soon as the server announces it or sends that much.

``safe_extract_tar`` checks every member of an archive before writing anything: only regular files and
folders whose normalised path stays inside the target folder are accepted (no absolute paths, no ``..``,
no symbolic or hard links, no devices). The members are written to a temporary folder next to the target
and moved into place when all of them have been written.

Example (a local file URL, so that it runs offline):
    >>> import tempfile
    >>> from pathlib import Path
    >>> from fwdgrad.data.download import download_file
    >>> from fwdgrad.data.resources import md5_of_bytes
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     source = Path(tmp, "src.bin")
    ...     _ = source.write_bytes(b"hello")
    ...     out = download_file(source.as_uri(), Path(tmp, "copy.bin"), md5=md5_of_bytes(b"hello"))
    ...     out.read_bytes()
    b'hello'
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from fwdgrad._io import atomic_file
from fwdgrad.data.resources import CorruptFileError, DatasetResources, FileResource

_CHUNK = 1 << 16
MAX_DOWNLOAD_BYTES = 1 << 30


class DownloadError(OSError):
    """A file could not be fetched from any of its URLs."""


class UnsafeArchiveError(ValueError):
    """An archive holds a member that would be written outside the target folder, or a link/device."""


def download_file(
    url: str,
    destination: str | os.PathLike,
    *,
    md5: str | None,
    timeout: float = 60.0,
    progress: Callable[[int, int | None], None] | None = None,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
) -> Path:
    """Fetch ``url`` into ``destination`` atomically, verifying its size and md5.

    Args:
        url: any URL ``urllib`` opens (``http(s)://``, ``file://``).
        destination: the final path; its folder is created if needed.
        md5: the expected hex md5; ``None`` skips the check (then only the announced size is checked).
        timeout: socket timeout in seconds.
        progress: optional ``progress(bytes_so_far, total_or_None)`` callback.
        max_bytes: the largest file accepted; a larger one is cut off and refused (nothing is written).

    Returns:
        ``destination`` as a ``Path``.

    Raises:
        DownloadError: the URL could not be read, the connection ended early, or the file is larger than
            ``max_bytes`` (nothing is written).
        CorruptFileError: the content does not match ``md5`` (nothing is written).
    """
    destination = Path(destination)
    if not timeout > 0:
        raise ValueError(f"download_file: timeout must be > 0, got {timeout!r}")
    with atomic_file(destination, suffix=".part") as handle:  # an exception below leaves nothing behind
        digest, size = _stream_into(url, handle, timeout, progress, max_bytes)
        if md5 is not None and digest != md5:
            raise CorruptFileError(
                f"download_file: {url} has md5 {digest} ({size} bytes) but the official file has md5 {md5}; "
                f"{destination} was not written. The server sent a truncated or different file: try again "
                "later or another mirror, or copy the official file there by hand."
            )
    return destination


def _stream_into(
    url: str, handle, timeout: float, progress: Callable[[int, int | None], None] | None, max_bytes: int
) -> tuple[str, int]:
    """Copy ``url`` into the open binary ``handle``; return (md5 hex, byte count)."""
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    too_big = f"download_file: {url} is larger than max_bytes={max_bytes}; refused"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            announced = response.headers.get("Content-Length")
            total = int(announced) if announced is not None and announced.isdigit() else None
            if total is not None and total > max_bytes:
                raise DownloadError(f"{too_big} (the server announces {total} bytes)")
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise DownloadError(too_big)
                handle.write(chunk)
                digest.update(chunk)
                if progress is not None:
                    progress(size, total)
    except DownloadError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:  # http.client.IncompleteRead is a ValueError
        raise DownloadError(f"download_file: could not read {url}: {exc}") from exc
    if total is not None and size != total:
        raise DownloadError(f"download_file: {url} ended after {size} of {total} bytes (connection dropped)")
    return digest.hexdigest(), size


def fetch_resource(
    resource: FileResource,
    folder: str | os.PathLike,
    base_urls: Iterable[str],
    *,
    timeout: float = 60.0,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Download one official file into ``folder``, trying each base URL in turn; return its path."""
    destination = Path(folder) / resource.filename
    errors: list[str] = []
    for base in base_urls:
        url = base.rstrip("/") + "/" + resource.filename
        if log is not None:
            log(f"downloading {url} -> {destination}")
        try:
            return download_file(url, destination, md5=resource.md5, timeout=timeout)
        except (DownloadError, CorruptFileError) as exc:
            errors.append(str(exc))
    raise DownloadError(
        f"fetch_resource: could not download {resource.filename} into {folder}:\n  "
        + "\n  ".join(errors)
        + f"\nDownload it by hand (md5 {resource.md5}) and put it at {destination}."
    )


def fetch_dataset_files(
    resources: DatasetResources,
    folder: str | os.PathLike,
    *,
    mirror: str | None = None,
    missing_only: bool = True,
    log: Callable[[str], None] | None = print,
) -> list[Path]:
    """Download every file of ``resources`` into ``folder`` (from ``mirror`` when given)."""
    bases = (mirror,) if mirror is not None else resources.base_urls
    paths = []
    for resource in resources.files:
        path = Path(folder) / resource.filename
        if missing_only and path.exists():
            paths.append(path)
            continue
        paths.append(fetch_resource(resource, folder, bases, log=log))
    return paths


def _check_member(member: tarfile.TarInfo, archive: Path) -> PurePosixPath:
    """The member's path relative to the target, or UnsafeArchiveError."""
    name = PurePosixPath(member.name)
    where = f"safe_extract_tar: {archive} member {member.name!r}"
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(f"{where} is a link (to {member.linkname!r}); links are refused")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"{where} is not a regular file or folder; refused")
    if not name.parts:  # "." or "./": the target folder itself
        if member.isdir():
            return PurePosixPath()
        raise UnsafeArchiveError(f"{where} has an empty path; refused")
    if name.is_absolute() or member.name.startswith(("/", "\\")) or ":" in name.parts[0]:
        raise UnsafeArchiveError(f"{where} has an absolute path; refused")
    if any(part == ".." for part in name.parts) or "\\" in member.name:
        raise UnsafeArchiveError(f"{where} would be written outside the target folder; refused")
    return PurePosixPath(*[part for part in name.parts if part not in ("", ".")])


def safe_extract_tar(archive: str | os.PathLike, target: str | os.PathLike) -> list[Path]:
    """Extract ``archive`` (any compression tarfile reads) into ``target``; return the top-level paths.

    Every member is checked before anything is written (see the module docstring); a top-level entry that
    already exists in ``target`` is replaced only once the whole archive has been extracted.

    Raises:
        UnsafeArchiveError: a member is a link/device or its path leaves ``target``.
        CorruptFileError: the archive cannot be read (truncated or not a tar file).
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target, prefix=".extract-"))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                relative = [_check_member(member, archive) for member in members]
                for member, rel in zip(members, relative):
                    out = staging.joinpath(*rel.parts)
                    if member.isdir():
                        out.mkdir(parents=True, exist_ok=True)
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    if source is None:  # pragma: no cover - isfile() members always have data
                        raise CorruptFileError(f"safe_extract_tar: {archive} member {member.name!r} has no data")
                    with source, open(out, "wb") as sink:
                        shutil.copyfileobj(source, sink)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise CorruptFileError(
                f"safe_extract_tar: cannot read {archive} ({exc}): it is truncated or not a tar archive. "
                f"Delete it and download it again (`--download`)."
            ) from exc
        tops = sorted(staging.iterdir())
        placed = []
        for top in tops:
            final = target / top.name
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            os.replace(top, final)
            placed.append(final)
        return placed
    finally:
        shutil.rmtree(staging, ignore_errors=True)
