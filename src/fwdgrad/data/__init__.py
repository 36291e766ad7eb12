"""Datasets for the benchmarks: MNIST-1D (generated offline), MNIST, Fashion-MNIST and CIFAR-10.

``load_dataset(name, data_dir)`` returns a :class:`Dataset` of whole tensors (these datasets fit in memory):

============== ===================== ======= ========================================================
name           x shape (per example) classes source
============== ===================== ======= ========================================================
mnist1d        ``[40]``              10      generated from the canonical recipe, seed 42 (no files)
mnist          ``[1, 28, 28]``       10      official IDX files (``train-images-idx3-ubyte.gz`` ...)
fashion-mnist  ``[1, 28, 28]``       10      official IDX files, same names as MNIST
cifar10        ``[3, 32, 32]``       10      official ``cifar-10-python.tar.gz`` (or its extracted folder)
seqmnist       ``[28, 28]``          10      the MNIST files: 28 steps of one 28-pixel row
pixelmnist     ``[784, 1]``          10      the MNIST files: 784 steps of one pixel (raster order)
============== ===================== ======= ========================================================

Normalisation (inputs are float32, labels int64):

- ``mnist1d``: as published, the whole generated array is standardised by its scalar mean and std.
- ``mnist``/``fashion-mnist``: pixels ``/ 255``, then ``(x - m) / s`` with the scalar mean ``m`` and std ``s``
  of the *training* images (MNIST: m ≈ 0.1307, s ≈ 0.3081), applied to train and test alike.
- ``cifar10``: pixels ``/ 255``, then per-channel ``(x - m_c) / s_c`` with training-set statistics.

Where files are looked for, given ``data_dir`` (default: ``$FWDGRAD_DATA_DIR``, else ``./data``), in order:
``data_dir/<name>/`` (e.g. ``../shared/data`` holds ``mnist/`` and ``fashion-mnist/``), torchvision's
folder (``data_dir/MNIST/raw``, ``data_dir/FashionMNIST/raw``), then ``data_dir/`` itself (so pointing at
``../shared/data/mnist`` works too). IDX files may be gzipped (official names) or uncompressed (same name
without ``.gz``). Every official file is checked against its official md5, so a truncated, corrupted or
mismatched file (say, MNIST files asked for as Fashion-MNIST) is reported with its path and what to do.
Gzipped files are decompressed as a stream, never past the size their IDX header declares (256 MiB at
most), so a gzip bomb is refused after a few kilobytes (:mod:`fwdgrad.data.idx`); ``available_datasets``
(``fwdgrad datasets``) checks the md5 of every file it finds before it calls a dataset available.
With ``download=True`` missing files are fetched (checksum-verified, atomically) into ``data_dir/<name>/``,
or into ``data_dir`` when its last component already is ``<name>``.

Example:
    >>> from fwdgrad.data import load_dataset
    >>> ds = load_dataset("mnist1d")
    >>> ds.input_shape, ds.num_classes, len(ds.y_train), len(ds.y_test)
    ((40,), 10, 4000, 1000)
"""

from __future__ import annotations

from fwdgrad.data.download import DownloadError, UnsafeArchiveError
from fwdgrad.data.mnist1d import MNIST1DConfig, make_mnist1d
from fwdgrad.data.registry import Dataset, DatasetInfo, available_datasets, default_data_dir, load_dataset
from fwdgrad.data.resources import RESOURCES, CorruptFileError

__all__ = [
    "RESOURCES",
    "CorruptFileError",
    "Dataset",
    "DatasetInfo",
    "DownloadError",
    "MNIST1DConfig",
    "UnsafeArchiveError",
    "available_datasets",
    "default_data_dir",
    "load_dataset",
    "make_mnist1d",
]
