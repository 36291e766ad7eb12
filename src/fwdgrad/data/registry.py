"""The dataset registry: the built-in datasets by name, where their files are looked for, how they are
verified and loaded into a :class:`Dataset` (:mod:`fwdgrad.data` has the table of names, shapes and
normalisation, and the search order)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fwdgrad.data.cifar import cifar10_folder_complete, read_cifar10_folder
from fwdgrad.data.download import fetch_dataset_files, safe_extract_tar
from fwdgrad.data.idx import read_idx
from fwdgrad.data.mnist1d import MNIST1DConfig, make_mnist1d
from fwdgrad.data.resources import CIFAR10_FOLDER, RESOURCES, CorruptFileError, md5_of_file, redownload_hint
from fwdgrad.data.sequence import SEQUENCE_BASE, SEQUENCE_VIEWS


@dataclass(frozen=True, repr=False)
class Dataset:
    """A whole dataset in memory.

    Attributes:
        name: registry name (``"mnist1d"``, ``"mnist"``, ...).
        x_train: float32 ``[N_train, *input_shape]``, normalised (see the module docstring).
        y_train: int64 ``[N_train]`` in ``0 .. num_classes - 1``.
        x_test: float32 ``[N_test, *input_shape]``, normalised with the training statistics.
        y_test: int64 ``[N_test]``.
        num_classes: number of classes.
        source: where it came from: a folder, or ``"generated: mnist1d seed=42"``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    source: str

    def __post_init__(self) -> None:
        where = f"Dataset({self.name!r})"
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if not x.dtype.is_floating_point:
                raise ValueError(f"{where}: x_{split} must be floating point, got {x.dtype}")
            if y.dtype != torch.int64 or y.dim() != 1:
                raise ValueError(f"{where}: y_{split} must be int64 of shape [N], got {y.dtype} {tuple(y.shape)}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{where}: x_{split} has {x.shape[0]} examples but y_{split} has {y.shape[0]}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"{where}: y_{split} must lie in 0..{self.num_classes - 1}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"{where}: train and test inputs differ in shape: "
                f"{tuple(self.x_train.shape[1:])} vs {tuple(self.x_test.shape[1:])}"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(1, 28, 28)``."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes}, source={self.source!r})"
        )


@dataclass(frozen=True)
class DatasetInfo:
    """What ``fwdgrad datasets`` lists for one dataset.

    Attributes:
        name: registry name.
        description: one line.
        input_shape: shape of one input.
        num_classes: number of classes.
        files: the official file names read (empty for generated data).
        urls: where ``download=True`` fetches them from, in order.
        location: the folder it would be read from now, or what is missing or corrupt and where.
        available: whether the files are all there and (when verified) match their official md5s, so that
            ``load_dataset`` would succeed now without downloading.
    """

    name: str
    description: str
    input_shape: tuple[int, ...]
    num_classes: int
    files: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    location: str = ""
    available: bool = False


@dataclass(frozen=True)
class _Spec:
    description: str
    input_shape: tuple[int, ...]
    num_classes: int = 10
    aliases: tuple[str, ...] = field(default_factory=tuple)


_SPECS: dict[str, _Spec] = {
    "mnist1d": _Spec("MNIST-1D (Greydanus 2020): 1-D digit signals, 4000 train / 1000 test", (40,)),
    "mnist": _Spec("MNIST handwritten digits, 60000 train / 10000 test", (1, 28, 28), aliases=("MNIST/raw",)),
    "fashion-mnist": _Spec(
        "Fashion-MNIST (Zalando) clothing images, 60000 train / 10000 test",
        (1, 28, 28),
        aliases=("FashionMNIST/raw", "fashion_mnist"),
    ),
    "cifar10": _Spec("CIFAR-10 colour images, 50000 train / 10000 test", (3, 32, 32), aliases=("cifar-10",)),
    "seqmnist": _Spec("sequential MNIST: 28 steps of one 28-pixel row (the MNIST files)", (28, 28)),
    "pixelmnist": _Spec("pixel-by-pixel MNIST: 784 steps of one pixel (the MNIST files)", (784, 1)),
}


def default_data_dir() -> Path:
    """``$FWDGRAD_DATA_DIR`` if set, else ``./data``."""
    return Path(os.environ.get("FWDGRAD_DATA_DIR", "data"))


def _check_name(where: str, name: str) -> None:
    if name not in _SPECS:
        raise ValueError(f"{where}: unknown dataset {name!r}; available: {', '.join(_SPECS)}")


def _candidate_folders(name: str, data_dir: Path) -> list[Path]:
    """Folders searched for ``name``'s files, in order (see the module docstring)."""
    folders = [data_dir / name, *(data_dir / alias for alias in _SPECS[name].aliases), data_dir]
    unique: list[Path] = []
    for folder in folders:
        if folder not in unique:
            unique.append(folder)
    return unique


def _download_folder(name: str, data_dir: Path) -> Path:
    return data_dir if data_dir.name == name else data_dir / name


def _idx_paths(name: str, folder: Path) -> list[Path | None]:
    """For each official file, the existing gz or uncompressed copy in ``folder`` (or None)."""
    found: list[Path | None] = []
    for resource in RESOURCES[name].files:
        candidates = [folder / resource.filename]
        if resource.raw_filename is not None:
            candidates.append(folder / resource.raw_filename)
        found.append(next((path for path in candidates if path.is_file()), None))
    return found


def _has_files(name: str, folder: Path) -> tuple[bool, bool]:
    """(complete, partial): whether ``folder`` holds all / some of ``name``'s files."""
    if name == "cifar10":
        tarball = folder / RESOURCES[name].files[0].filename
        complete = cifar10_folder_complete(folder) or tarball.is_file()
        return complete, complete
    paths = _idx_paths(name, folder)
    return all(p is not None for p in paths), any(p is not None for p in paths)


def _locate(name: str, data_dir: Path) -> tuple[Path | None, Path | None]:
    """(complete folder or None, first folder holding some of the files or None)."""
    partial = None
    for folder in _candidate_folders(name, data_dir):
        complete, some = _has_files(name, folder)
        if complete:
            return folder, folder
        if some and partial is None:
            partial = folder
    return None, partial


def _verify_files(name: str, folder: Path) -> str | None:
    """``None`` when every file of ``name`` in ``folder`` has its official md5, else what is wrong."""
    resources = RESOURCES[name]
    if name == "cifar10":
        if cifar10_folder_complete(folder) and resources.extracted_md5:
            checks = [(folder / CIFAR10_FOLDER / f, md5) for f, md5 in resources.extracted_md5.items()
                      if (folder / CIFAR10_FOLDER / f).is_file()]
        elif cifar10_folder_complete(folder):
            checks = []
        else:
            checks = [(folder / resources.files[0].filename, resources.files[0].md5)]
    else:
        checks = []
        for resource, path in zip(resources.files, _idx_paths(name, folder)):
            expected = resource.md5 if path is not None and path.name == resource.filename else resource.raw_md5
            if path is not None and expected is not None:
                checks.append((path, expected))
    for path, expected in checks:
        try:
            actual = md5_of_file(path)
        except OSError as exc:
            return f"{path} cannot be read ({exc.strerror})"
        if actual != expected:
            return f"{path} has md5 {actual}, not the official {expected}. {redownload_hint(path)}"
    return None


def _missing_message(name: str, data_dir: Path, partial: Path | None) -> str:
    resources = RESOURCES[name]
    wanted = ", ".join(r.filename for r in resources.files)
    if name == "cifar10":
        wanted += " (or its extracted folder cifar-10-batches-py/)"
    elif any(r.raw_filename for r in resources.files):
        wanted += " (gzipped, or uncompressed without .gz)"
    looked = ", ".join(str(f) for f in _candidate_folders(name, data_dir))
    detail = f" {partial} holds only some of them." if partial is not None else ""
    return (
        f"load_dataset: the {name} files were not found. Looked for {wanted} in: {looked}.{detail} "
        f"Put the official files in {_download_folder(name, data_dir)} (or point data_dir / `--data-dir` at "
        f"the folder that holds them), or pass download=True (`--download`) to fetch them (from "
        f"{resources.base_urls[0]})."
    )


def _standardise(train: np.ndarray, test: np.ndarray, channel_axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images -> float32 in [0, 1] -> standardised by training mean/std (per channel if asked)."""
    x_train = torch.from_numpy(np.array(train, dtype=np.float32)).div_(255.0)  # np.array copies: writable
    x_test = torch.from_numpy(np.array(test, dtype=np.float32)).div_(255.0)
    if channel_axis is None:
        mean, std = x_train.mean(), x_train.std()
    else:
        dims = [d for d in range(x_train.dim()) if d != channel_axis]
        shape = [1] * x_train.dim()
        shape[channel_axis] = -1
        mean = x_train.mean(dim=dims).reshape(shape)
        std = x_train.std(dim=dims).reshape(shape)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant image set stays finite
    return (x_train - mean) / std, (x_test - mean) / std


def _load_idx(name: str, folder: Path) -> Dataset:
    arrays = []
    for resource, path in zip(RESOURCES[name].files, _idx_paths(name, folder)):
        assert path is not None  # _locate checked
        arrays.append(read_idx(path, md5=resource.md5, raw_md5=resource.raw_md5))
    train_images, train_labels, test_images, test_labels = arrays
    for images, labels, split in ((train_images, train_labels, "train"), (test_images, test_labels, "t10k")):
        if images.shape[1:] != (28, 28) or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise CorruptFileError(
                f"load_dataset: {folder} {split} files disagree: images {images.shape}, labels {labels.shape} "
                f"(expected [n, 28, 28] and [n]). {redownload_hint(folder)}"
            )
    x_train, x_test = _standardise(train_images[:, None], test_images[:, None], channel_axis=None)
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=torch.from_numpy(train_labels.astype(np.int64)),
        x_test=x_test,
        y_test=torch.from_numpy(test_labels.astype(np.int64)),
        num_classes=_SPECS[name].num_classes,
        source=str(folder),
    )


def _load_cifar10(folder: Path) -> Dataset:
    resources = RESOURCES["cifar10"]
    if not cifar10_folder_complete(folder):
        tarball = folder / resources.files[0].filename
        actual = md5_of_file(tarball)
        if actual != resources.files[0].md5:
            raise CorruptFileError(
                f"{tarball}: md5 {actual} differs from the official {resources.files[0].md5}: the archive is "
                f"truncated or corrupted. {redownload_hint(tarball)}"
            )
        safe_extract_tar(tarball, folder)
        if not cifar10_folder_complete(folder):
            raise CorruptFileError(f"{tarball}: the archive lacks cifar-10-batches-py/. {redownload_hint(tarball)}")
    x_train, y_train, x_test, y_test = read_cifar10_folder(folder, checksums=resources.extracted_md5)
    x_train_f, x_test_f = _standardise(x_train, x_test, channel_axis=1)
    return Dataset(
        name="cifar10",
        x_train=x_train_f,
        y_train=torch.from_numpy(y_train),
        x_test=x_test_f,
        y_test=torch.from_numpy(y_test),
        num_classes=10,
        source=str(folder),
    )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    mirror: str | None = None,
) -> Dataset:
    """Load a dataset by name (see the module docstring for names, shapes, normalisation and file layout).

    Args:
        name: ``"mnist1d"``, ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``.
        data_dir: folder holding the files (``data_dir/<name>/`` or ``data_dir/`` directly); ignored by
            ``mnist1d``, which is generated in about a second. Default: ``$FWDGRAD_DATA_DIR`` or ``./data``.
        download: fetch missing files (official URLs, checksum-verified, written atomically).
        mirror: base URL to fetch from instead of the official ones (e.g. a local server in tests).

    Raises:
        ValueError: unknown ``name``.
        FileNotFoundError: files missing and ``download`` is false; says where it looked and what to do.
        CorruptFileError: a file is truncated, corrupted or not the official one (path and remedy given).
        DownloadError: a download failed (nothing partial is left behind).

    Example:
        >>> load_dataset("mnist1d").x_train.shape
        torch.Size([4000, 40])
    """
    _check_name("load_dataset", name)
    if name in SEQUENCE_VIEWS:
        base = load_dataset(SEQUENCE_BASE[name], data_dir, download=download, mirror=mirror)
        view = SEQUENCE_VIEWS[name]
        return Dataset(
            name, view(base.x_train), base.y_train, view(base.x_test), base.y_test, base.num_classes, base.source
        )
    if name == "mnist1d":
        cfg = MNIST1DConfig()
        x_train, y_train, x_test, y_test = make_mnist1d(cfg)
        return Dataset(name, x_train, y_train, x_test, y_test, 10, f"generated: mnist1d seed={cfg.seed}")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    folder, partial = _locate(name, root)
    if folder is None:
        if not download:
            raise FileNotFoundError(_missing_message(name, root, partial))
        folder = partial if partial is not None else _download_folder(name, root)
        fetch_dataset_files(RESOURCES[name], folder, mirror=mirror)
        # a folder with some gzipped files and some uncompressed ones is complete now
    if name == "cifar10":
        return _load_cifar10(folder)
    return _load_idx(name, folder)


def available_datasets(data_dir: str | os.PathLike | None = None, *, verify: bool = True) -> list[DatasetInfo]:
    """Every dataset ``load_dataset`` knows, with where it would be read from under ``data_dir`` now.

    With ``verify`` (the default) every file found is checked against its official md5 (streamed, about
    0.3 s for CIFAR-10), and a dataset with a corrupt file is listed as not available, with the file.

    Example:
        >>> [info.name for info in available_datasets()]
        ['mnist1d', 'mnist', 'fashion-mnist', 'cifar10', 'seqmnist', 'pixelmnist']
    """
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    infos = []
    for name, spec in _SPECS.items():
        if name == "mnist1d":
            infos.append(
                DatasetInfo(
                    name, spec.description, spec.input_shape, spec.num_classes,
                    location=f"generated offline (canonical generator, seed {MNIST1DConfig().seed}; no files)",
                    available=True,
                )
            )  # fmt: skip
            continue
        if name in SEQUENCE_VIEWS:
            base = next(i for i in infos if i.name == SEQUENCE_BASE[name])
            infos.append(
                DatasetInfo(
                    name, spec.description, spec.input_shape, spec.num_classes, base.files, base.urls,
                    base.location, base.available,
                )
            )  # fmt: skip
            continue
        resources = RESOURCES[name]
        folder, partial = _locate(name, root)
        problem = _verify_files(name, folder) if verify and folder is not None else None
        if problem is not None:
            location = f"corrupt: {problem}"
        elif folder is not None:
            location = str(folder)
        else:
            looked = ", ".join(str(f) for f in _candidate_folders(name, root))
            location = f"missing (looked in {looked}; partial copy in {partial})" if partial else f"missing ({looked})"
        infos.append(
            DatasetInfo(
                name,
                spec.description,
                spec.input_shape,
                spec.num_classes,
                files=tuple(r.filename for r in resources.files),
                urls=tuple(resources.base_urls[0].rstrip("/") + "/" + r.filename for r in resources.files),
                location=location,
                available=folder is not None and problem is None,
            )
        )
    return infos
