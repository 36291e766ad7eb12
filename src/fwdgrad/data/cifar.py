"""CIFAR-10 from the official python tarball (``cifar-10-python.tar.gz``).

The tarball holds ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``; each batch is a
pickled dict with ``data`` (uint8 ``[n, 3072]``, rows are ``R(32x32) G(32x32) B(32x32)``) and ``labels``
(``n`` ints in 0..9). Pickles can run code when loaded, so they are read with an unpickler that only
builds plain containers and NumPy arrays and refuses every other global.

Example:
    >>> from fwdgrad.data.cifar import CIFAR10_FILES
    >>> CIFAR10_FILES[-1]
    'test_batch'
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fwdgrad.data.resources import CIFAR10_BATCH_MD5, CIFAR10_FOLDER, CorruptFileError, md5_of_bytes, redownload_hint

CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FILES: tuple[str, ...] = (*CIFAR10_TRAIN_FILES, "test_batch")

# The globals a pickled NumPy array needs (NumPy 1.x and 2.x module names, and protocol-2 bytes).
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds only builtin containers/scalars and NumPy arrays."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def read_cifar_batch(path: str | os.PathLike, *, md5: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 images ``[n, 3, 32, 32]``, int64 labels ``[n]``), format- and md5-checked."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        batch = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as exc:  # any unpickling failure means a bad file
        raise CorruptFileError(f"{path}: not a readable CIFAR-10 batch ({exc}). {redownload_hint(path)}") from exc
    if not isinstance(batch, dict):
        raise CorruptFileError(f"{path}: expected a pickled dict, got {type(batch).__name__}. {redownload_hint(path)}")
    batch = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise CorruptFileError(f"{path}: no 'data'/'labels' entries. {redownload_hint(path)}")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise CorruptFileError(
            f"{path}: data must be uint8 [n, 3072] with n labels, got {data.dtype} {data.shape} and "
            f"{labels.shape[0]} labels. {redownload_hint(path)}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise CorruptFileError(f"{path}: labels outside 0..9. {redownload_hint(path)}")
    if md5 is not None and (actual := md5_of_bytes(raw)) != md5:
        raise CorruptFileError(f"{path}: md5 {actual} differs from the official {md5}. {redownload_hint(path)}")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10_folder(
    folder: str | os.PathLike, *, checksums: Mapping[str, str] | None = CIFAR10_BATCH_MD5
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read ``folder/cifar-10-batches-py`` -> (x_train uint8 [50000,3,32,32], y_train, x_test, y_test)."""
    batches = Path(folder) / CIFAR10_FOLDER
    checksums = checksums or {}
    parts = [read_cifar_batch(batches / name, md5=checksums.get(name)) for name in CIFAR10_FILES]
    x_train = np.concatenate([x for x, _ in parts[:-1]])
    y_train = np.concatenate([y for _, y in parts[:-1]])
    x_test, y_test = parts[-1]
    return x_train, y_train, x_test, y_test


def cifar10_folder_complete(folder: str | os.PathLike) -> bool:
    """Whether ``folder/cifar-10-batches-py`` holds all six batch files."""
    batches = Path(folder) / CIFAR10_FOLDER
    return all((batches / name).is_file() for name in CIFAR10_FILES)
