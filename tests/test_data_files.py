"""Loaders on small files in the real formats (IDX gz/raw, CIFAR-10 python tarball); no network."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import IDX_NAMES, make_cifar_files, make_idx_files
from fwdgrad.data import (
    RESOURCES,
    CorruptFileError,
    Dataset,
    available_datasets,
    load_dataset,
)
from fwdgrad.data.cifar import read_cifar_batch
from fwdgrad.data.idx import encode_idx, parse_idx, read_idx
from fwdgrad.data.resources import CIFAR10_FOLDER


@pytest.fixture
def small_mnist(monkeypatch):
    """Small IDX files whose md5s replace the official ones in the resources table."""
    files = make_idx_files()
    monkeypatch.setitem(RESOURCES, "mnist", files.resources("mnist"))
    return files


def _assert_matches(ds: Dataset, files) -> None:
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.y_train.tolist() == files.train_labels.tolist()
    assert ds.y_test.tolist() == files.test_labels.tolist()
    # standardised with the training mean/std of pixels / 255, applied to both splits
    pixels = torch.from_numpy(files.train_images.astype(np.float32) / 255)
    mean, std = pixels.mean(), pixels.std()
    torch.testing.assert_close(ds.x_train[:, 0], (pixels - mean) / std)
    test_pixels = torch.from_numpy(files.test_images.astype(np.float32) / 255)
    torch.testing.assert_close(ds.x_test[:, 0], (test_pixels - mean) / std)


@pytest.mark.parametrize("layout", ["data_dir/name", "data_dir itself", "torchvision"])
def test_idx_gz_layouts(tmp_path, small_mnist, layout):
    folder = {"data_dir/name": tmp_path / "mnist", "data_dir itself": tmp_path, "torchvision": tmp_path / "MNIST/raw"}
    small_mnist.write(folder[layout])
    ds = load_dataset("mnist", tmp_path)
    _assert_matches(ds, small_mnist)
    assert ds.source == str(folder[layout])


def test_idx_uncompressed_copies(tmp_path, small_mnist):
    small_mnist.write(tmp_path / "mnist", compressed=False)
    _assert_matches(load_dataset("mnist", tmp_path), small_mnist)


def test_missing_files_say_where_and_how(tmp_path, small_mnist):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", tmp_path)
    message = str(info.value)
    assert message.startswith("load_dataset:")
    assert str(tmp_path / "mnist") in message and "--data-dir" in message and "--download" in message


def test_partial_folder_is_reported(tmp_path, small_mnist):
    small_mnist.write(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="holds only some of them"):
        load_dataset("mnist", tmp_path)


def _corrupt(tmp_path: Path, small_mnist, name: str, data: bytes) -> Path:
    folder = small_mnist.write(tmp_path / "mnist")
    (folder / name).write_bytes(data)
    return folder / name


def test_truncated_gzip_is_reported_with_path_and_remedy(tmp_path, small_mnist):
    gz = small_mnist.gz["train-images-idx3-ubyte.gz"]
    path = _corrupt(tmp_path, small_mnist, "train-images-idx3-ubyte.gz", gz[: len(gz) // 2])
    with pytest.raises(CorruptFileError) as info:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(info.value) and "gzip" in str(info.value) and "Delete" in str(info.value)


def test_truncated_idx_content_is_reported(tmp_path, small_mnist):
    raw = small_mnist.raw["train-images-idx3-ubyte"]
    path = _corrupt(tmp_path, small_mnist, "train-images-idx3-ubyte.gz", gzip.compress(raw[:-100]))
    with pytest.raises(CorruptFileError, match="truncated") as info:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(info.value)


def test_wrong_magic_is_reported(tmp_path, small_mnist):
    raw = bytearray(small_mnist.raw["train-labels-idx1-ubyte"])
    raw[0] = 7
    _corrupt(tmp_path, small_mnist, "train-labels-idx1-ubyte.gz", gzip.compress(bytes(raw)))
    with pytest.raises(CorruptFileError, match="not an IDX file"):
        load_dataset("mnist", tmp_path)


def test_valid_but_different_file_fails_the_md5(tmp_path, small_mnist):
    other = make_idx_files(seed=1)
    path = _corrupt(tmp_path, small_mnist, "train-images-idx3-ubyte.gz", other.gz["train-images-idx3-ubyte.gz"])
    with pytest.raises(CorruptFileError, match="md5") as info:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(info.value)


def test_files_of_another_dataset_are_named(tmp_path, small_mnist, monkeypatch):
    """MNIST files asked for as Fashion-MNIST (same file names): the md5 says whose files they are."""
    fashion = make_idx_files(seed=5)
    monkeypatch.setitem(RESOURCES, "fashion-mnist", fashion.resources("fashion-mnist"))
    small_mnist.write(tmp_path)
    with pytest.raises(CorruptFileError, match="official mnist train-images"):
        load_dataset("fashion-mnist", tmp_path)


def test_labels_and_images_disagree(tmp_path, monkeypatch):
    files = make_idx_files()
    bad_raw = encode_idx(files.train_labels[:5])
    files.raw["train-labels-idx1-ubyte"] = bad_raw
    files.gz["train-labels-idx1-ubyte.gz"] = gzip.compress(bad_raw)
    monkeypatch.setitem(RESOURCES, "mnist", files.resources("mnist"))
    files.write(tmp_path)
    with pytest.raises(CorruptFileError, match="disagree"):
        load_dataset("mnist", tmp_path)


def test_images_must_be_28_by_28(tmp_path, monkeypatch):
    files = make_idx_files()
    bad_raw = encode_idx(files.train_images[:, :27, :])
    files.raw["train-images-idx3-ubyte"] = bad_raw
    files.gz["train-images-idx3-ubyte.gz"] = gzip.compress(bad_raw)
    monkeypatch.setitem(RESOURCES, "mnist", files.resources("mnist"))
    files.write(tmp_path)
    with pytest.raises(CorruptFileError, match=r"\[n, 28, 28\]"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(dtype):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    decoded = parse_idx(encode_idx(array))
    assert decoded.shape == array.shape and np.array_equal(decoded, array)


def test_idx_too_long_is_reported(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(encode_idx(np.arange(4, dtype=np.uint8)) + b"\x00")
    with pytest.raises(CorruptFileError, match="longer than its header"):
        read_idx(path)


# ---------------------------------------------------------------- CIFAR-10


@pytest.fixture
def small_cifar(monkeypatch):
    files = make_cifar_files()
    monkeypatch.setitem(RESOURCES, "cifar10", files.resources())
    return files


def _assert_cifar(ds: Dataset, files) -> None:
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    assert ds.y_train.tolist() == files.y_train.tolist() and ds.y_test.tolist() == files.y_test.tolist()
    pixels = torch.from_numpy(files.x_train.astype(np.float32) / 255)
    mean = pixels.mean(dim=(0, 2, 3), keepdim=True)
    std = pixels.std(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(ds.x_train, (pixels - mean) / std)
    torch.testing.assert_close(ds.x_test, (torch.from_numpy(files.x_test.astype(np.float32) / 255) - mean) / std)


def test_cifar_tarball_is_extracted_and_loaded(tmp_path, small_cifar):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    (folder / "cifar-10-python.tar.gz").write_bytes(small_cifar.tarball)
    ds = load_dataset("cifar10", tmp_path)
    _assert_cifar(ds, small_cifar)
    assert (folder / CIFAR10_FOLDER / "test_batch").is_file()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging folder left
    (folder / "cifar-10-python.tar.gz").unlink()  # the extracted folder alone is enough afterwards
    _assert_cifar(load_dataset("cifar10", tmp_path), small_cifar)


def test_cifar_corrupt_tarball_is_reported(tmp_path, small_cifar):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(small_cifar.tarball[:-50])
    with pytest.raises(CorruptFileError, match="md5") as info:
        load_dataset("cifar10", tmp_path)
    assert str(path) in str(info.value)


def test_cifar_batch_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Evil(), "labels": []}, protocol=2))
    with pytest.raises(CorruptFileError, match="not allowed"):
        read_cifar_batch(path)


def test_cifar_batch_of_wrong_shape_is_reported(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(CorruptFileError, match="uint8"):
        read_cifar_batch(path)


# ---------------------------------------------------------------- API


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match=r"^load_dataset: unknown dataset 'mnist2'"):
        load_dataset("mnist2")


def test_dataset_checks_its_tensors():
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="examples"):
        Dataset("toy", x, y[:3], x, y, 2, "test")
    with pytest.raises(ValueError, match="int64"):
        Dataset("toy", x, y.float(), x, y, 2, "test")
    with pytest.raises(ValueError, match=r"0\.\.1"):
        Dataset("toy", x, y + 2, x, y, 2, "test")
    ds = Dataset("toy", x, y, x, y, 2, "test")
    assert ds.input_shape == (3,) and "train=4" in repr(ds)


def test_available_datasets_reports_where(tmp_path, small_mnist):
    small_mnist.write(tmp_path / "mnist")
    infos = {info.name: info for info in available_datasets(tmp_path)}
    assert list(infos) == ["mnist1d", "mnist", "fashion-mnist", "cifar10"]
    assert infos["mnist1d"].available and infos["mnist1d"].input_shape == (40,)
    assert infos["mnist"].available and infos["mnist"].location == str(tmp_path / "mnist")
    assert infos["mnist"].files == tuple(f"{stem}.gz" for stem in IDX_NAMES)
    assert not infos["cifar10"].available and "missing" in infos["cifar10"].location
    assert infos["cifar10"].input_shape == (3, 32, 32)


def test_real_table_keeps_the_official_checksums():
    assert RESOURCES["mnist"].files[0].md5 == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert RESOURCES["fashion-mnist"].files[0].md5 == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    assert RESOURCES["cifar10"].files[0].md5 == "c58f30108f718f92721af3b95e74349a"
