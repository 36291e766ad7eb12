"""Reading the IDX files of MNIST and Fashion-MNIST, gzipped or not, with strict format checks.

IDX layout (LeCun et al.): bytes 0-1 are zero, byte 2 is the element type (``0x08`` unsigned byte, ``0x09``
signed byte, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64, all big-endian), byte 3
is the number of dimensions ``d``; then ``d`` big-endian uint32 sizes; then the elements in C order. A
file whose length is not exactly ``4 + 4 d + prod(sizes) * itemsize`` is reported as truncated/corrupt.

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

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from fwdgrad.data.resources import CorruptFileError, identify_md5, md5_of_bytes, redownload_hint

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


def gunzip_bytes(raw: bytes, path: str | os.PathLike = "<bytes>") -> bytes:
    """Decompress gzip ``raw`` (read from ``path``); a bad or truncated stream -> CorruptFileError."""
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise CorruptFileError(f"{path}: not a valid gzip file ({exc}). {redownload_hint(path)}") from exc


def read_idx(path: str | os.PathLike, *, md5: str | None = None, raw_md5: str | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) and check its format and, when given, its checksum.

    Args:
        path: the file.
        md5: expected md5 of the file as stored (checked for ``.gz`` files).
        raw_md5: expected md5 of the decompressed content (checked for uncompressed files).
    """
    path = Path(path)
    stored = path.read_bytes()
    content = gunzip_bytes(stored, path) if path.suffix == ".gz" else stored
    array = parse_idx(content, path)
    expected, actual = (md5, md5_of_bytes(stored)) if path.suffix == ".gz" else (raw_md5, md5_of_bytes(content))
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
