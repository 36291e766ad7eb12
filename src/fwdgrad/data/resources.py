"""Where each file-based dataset lives: official file names, URLs and md5 checksums.

``RESOURCES`` is the one table the loaders and the downloader read. The checksums are the official ones
(published by the dataset authors and reproduced by torchvision); the md5 of the *decompressed* IDX files
was computed from md5-verified official copies so that uncompressed copies are checked too. Tests replace
entries with ``monkeypatch.setitem(RESOURCES, name, ...)`` to serve their own small files.

Example:
    >>> from fwdgrad.data.resources import RESOURCES
    >>> [f.filename for f in RESOURCES["mnist"].files][:2]
    ['train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz']
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass


class CorruptFileError(ValueError):
    """A dataset file exists but is truncated, corrupted, of the wrong format or not the official one."""


@dataclass(frozen=True)
class FileResource:
    """One official file.

    Attributes:
        filename: the official name, as downloaded (``train-images-idx3-ubyte.gz``).
        md5: md5 of that file as downloaded.
        raw_md5: md5 of its decompressed content (``None``: not checked, or not a single gzip stream).
    """

    filename: str
    md5: str
    raw_md5: str | None = None

    @property
    def raw_filename(self) -> str | None:
        """Name of the decompressed copy (``train-images-idx3-ubyte``), or ``None`` for an archive (.tar.gz)."""
        if self.filename.endswith(".gz") and not self.filename.endswith(".tar.gz"):
            return self.filename[: -len(".gz")]
        return None


@dataclass(frozen=True)
class DatasetResources:
    """The files of one dataset and the base URLs they are fetched from (tried in order).

    ``extracted_md5`` maps the names of the files inside an archive (CIFAR-10's batches) to their md5.
    """

    name: str
    files: tuple[FileResource, ...]
    base_urls: tuple[str, ...]
    extracted_md5: Mapping[str, str] | None = None


# md5 of the members of the official CIFAR-10 tarball, as extracted (also in torchvision).
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_BATCH_MD5: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}


RESOURCES: dict[str, DatasetResources] = {
    "mnist": DatasetResources(
        name="mnist",
        files=(
            FileResource(
                "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"
            ),
            FileResource(
                "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"
            ),
            FileResource(
                "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"
            ),
            FileResource(
                "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"
            ),
        ),
        # yann.lecun.com is the original home; the PyTorch S3 mirror serves byte-identical files (same md5)
        # and is far more reliable, so it is tried first.
        base_urls=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    ),
    "fashion-mnist": DatasetResources(
        name="fashion-mnist",
        files=(
            FileResource(
                "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"
            ),
            FileResource(
                "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"
            ),
            FileResource(
                "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"
            ),
            FileResource(
                "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"
            ),
        ),
        base_urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    ),
    "cifar10": DatasetResources(
        name="cifar10",
        files=(FileResource("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        base_urls=("https://www.cs.toronto.edu/~kriz/",),
        extracted_md5=CIFAR10_BATCH_MD5,
    ),
}


def md5_of_bytes(data: bytes) -> str:
    """Hex md5 of ``data`` (used as a checksum only, not for security)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_of_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex md5 of the file at ``path``, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def identify_md5(md5: str) -> str | None:
    """``"<dataset> <file>"`` when ``md5`` is that of another official file in ``RESOURCES``, else None."""
    for resources in RESOURCES.values():
        for resource in resources.files:
            if md5 in (resource.md5, resource.raw_md5):
                return f"{resources.name} {resource.filename}"
    return None


def redownload_hint(path: str | os.PathLike) -> str:
    """The standard advice appended to every corrupt-file message."""
    return (
        f"Delete {os.fspath(path)!s} and download it again (fwdgrad.data.load_dataset(..., download=True), "
        "or `--download` on the command line), or copy the official file there."
    )
