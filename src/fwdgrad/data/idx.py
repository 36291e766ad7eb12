"""Reading the IDX files of MNIST and Fashion-MNIST, gzipped or not, with strict format checks.

IDX layout (LeCun et al.): bytes 0-1 are zero, byte 2 is the element type (``0x08`` unsigned byte, ``0x09``
signed byte, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64, all big-endian), byte 3
is the number of dimensions ``d``; then ``d`` big-endian uint32 sizes; then the elements in C order. A
file whose length is not exactly ``4 + 4 d + prod(sizes) * itemsize`` is reported as truncated/corrupt.

A gzipped file is decompressed as a stream, in chunks, while both md5s are computed: the header is checked
as soon as it has been decompressed, and decompression stops once the content exceeds what the header
declares, or ``max_bytes`` (256 MiB by default; the largest official file, MNIST's training images, is
47,040,016 bytes). So a gzip bomb (a small file that decompresses to gigabytes) is refused after at most
``max_bytes`` of memory, and usually after a few kilobytes.

Example:
    >>> import gzip, os, tempfile, numpy as np
    >>> from fwdgrad.data.idx import encode_idx, read_idx
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "labels-idx1-ubyte.gz")
    ...     with gzip.open(path, "wb") as f:
    ...         _ = f.write(encode_idx(np.array([3, 1, 4], dtype=np.uint8)))
    ...     read_idx(path).tolist()
    [3, 1, 4]
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from fwdgrad.data.resources import CorruptFileError, identify_md5, redownload_hint

MAX_IDX_BYTES = 1 << 28  # 256 MiB: over five times the largest official IDX file (47,040,016 bytes)
_CHUNK = 1 << 16

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES: dict[np.dtype, int] = {dtype.newbyteorder(">"): code for code, dtype in _IDX_DTYPES.items()}


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array`` (the inverse of :func:`parse_idx`); used to build test files."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    code = _IDX_CODES.get(dtype.newbyteorder(">"))
    if code is None:
        raise ValueError(f"encode_idx: unsupported dtype {array.dtype}")
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def parse_idx(data: bytes, path: str | os.PathLike = "<bytes>") -> np.ndarray:
    """Decode IDX ``data`` into a (read-only) array; raise :class:`CorruptFileError` naming ``path``."""
    if len(data) < 4:
        raise CorruptFileError(f"{path}: too short to be an IDX file ({len(data)} bytes). {redownload_hint(path)}")
    zero0, zero1, code, ndim = struct.unpack(">BBBB", data[:4])
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise CorruptFileError(
            f"{path}: not an IDX file (magic bytes {data[:4].hex()}; expected 0000 then a type code and a rank). "
            f"{redownload_hint(path)}"
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise CorruptFileError(f"{path}: IDX header is truncated. {redownload_hint(path)}")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    dtype = _IDX_DTYPES[code]
    expected = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise CorruptFileError(
            f"{path}: IDX data is {state} (shape {shape} needs {expected} bytes, found {len(data)}). "
            f"{redownload_hint(path)}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)


def _declared_size(head: bytes | bytearray, path: str | os.PathLike) -> int | None:
    """The total byte count the IDX header at the start of ``head`` declares (``None``: header incomplete);
    a header that cannot be IDX raises CorruptFileError at once."""
    if len(head) < 4:
        return None
    zero0, zero1, code, ndim = struct.unpack(">BBBB", head[:4])
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        parse_idx(bytes(head[:4]), path)  # raises with the standard message
    header_size = 4 + 4 * ndim
    if len(head) < header_size:
        return None
    shape = struct.unpack(f">{ndim}I", head[4:header_size])
    return header_size + int(np.prod(shape, dtype=np.int64)) * _IDX_DTYPES[code].itemsize


def _gunzip_idx(handle, path: Path, max_bytes: int, stored_md5) -> bytearray:
    """Decompress the open gzip ``handle`` chunk by chunk into a buffer, updating ``stored_md5`` with the
    compressed bytes; stop with CorruptFileError as soon as the content is not IDX, exceeds the size its
    header declares, or exceeds ``max_bytes``. Several gzip members are read one after the other."""
    out = bytearray()
    limit = max_bytes
    declared: int | None = None
    inflater = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
    started = False  # some input went into the current member

    def too_big() -> CorruptFileError:
        what = (f"the {declared} bytes its IDX header declares" if declared is not None and declared <= max_bytes
                else f"the {max_bytes}-byte cap (max_bytes)")
        return CorruptFileError(
            f"{path}: decompresses to more than {what}; refused before reading further (a gzip bomb or a "
            f"corrupted file). {redownload_hint(path)}"
        )

    try:
        while chunk := handle.read(_CHUNK):
            stored_md5.update(chunk)
            data = chunk
            while data:
                if inflater.eof:  # the next gzip member
                    inflater, started = zlib.decompressobj(wbits=31), False
                started = True
                out += inflater.decompress(data, min(limit - len(out) + 1, _CHUNK))  # at most 64 KiB a call
                data = inflater.unconsumed_tail or (inflater.unused_data if inflater.eof else b"")
                if declared is None and (declared := _declared_size(out, path)) is not None:
                    if declared > max_bytes:
                        raise too_big()
                    limit = declared
                if len(out) > limit:
                    raise too_big()
        if not started or not inflater.eof:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
    except (EOFError, zlib.error) as exc:
        raise CorruptFileError(f"{path}: not a valid gzip file ({exc}). {redownload_hint(path)}") from exc
    return out


def read_idx(
    path: str | os.PathLike, *, md5: str | None = None, raw_md5: str | None = None, max_bytes: int = MAX_IDX_BYTES
) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) and check its format and, when given, its checksum.

    Args:
        path: the file.
        md5: expected md5 of the file as stored (checked for ``.gz`` files).
        raw_md5: expected md5 of the decompressed content (checked for uncompressed files).
        max_bytes: the largest content accepted (decompressed size for ``.gz``); a larger file is refused
            before it is read or decompressed past that size.
    """
    path = Path(path)
    stored_md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        if path.suffix == ".gz":
            content = _gunzip_idx(handle, path, max_bytes, stored_md5)
            expected, actual = md5, stored_md5.hexdigest()
        else:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise CorruptFileError(f"{path}: {size} bytes, more than the {max_bytes}-byte cap (max_bytes); "
                                       f"refused. {redownload_hint(path)}")
            content = bytearray(handle.read())
            stored_md5.update(content)
            expected, actual = raw_md5, stored_md5.hexdigest()
    array = parse_idx(memoryview(content).toreadonly(), path)
    if expected is not None and actual != expected:
        other = identify_md5(actual)
        cause = (
            f"it is the official {other} file (data_dir points at the wrong dataset?)"
            if other
            else "the file is corrupted or not the official one"
        )
        raise CorruptFileError(
            f"{path}: md5 {actual} differs from the official {expected}: {cause}. {redownload_hint(path)}"
        )
    return array
