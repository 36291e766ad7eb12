"""Loaders on small files in the real formats (IDX gz/raw, CIFAR-10 python tarball); no network."""

from __future__ import annotations

import gzip
import pickle
import struct
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
    assert list(infos) == ["mnist1d", "mnist", "fashion-mnist", "cifar10", "seqmnist", "pixelmnist"]
    assert infos["mnist1d"].available and infos["mnist1d"].input_shape == (40,)
    assert infos["mnist"].available and infos["mnist"].location == str(tmp_path / "mnist")
    assert infos["mnist"].files == tuple(f"{stem}.gz" for stem in IDX_NAMES)
    assert not infos["cifar10"].available and "missing" in infos["cifar10"].location
    assert infos["cifar10"].input_shape == (3, 32, 32)


def test_real_table_keeps_the_official_checksums():
    assert RESOURCES["mnist"].files[0].md5 == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert RESOURCES["fashion-mnist"].files[0].md5 == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    assert RESOURCES["cifar10"].files[0].md5 == "c58f30108f718f92721af3b95e74349a"


# --- gzip bombs and oversized files are refused while streaming (issue 15) ---------------------------------
def _gzip_of(parts, *, zeros: int = 0, level: int = 1) -> bytes:
    """A gzip stream of ``parts`` followed by ``zeros`` zero bytes, built chunk by chunk (small on disk)."""
    import zlib

    packer = zlib.compressobj(level, zlib.DEFLATED, 31)
    out = [packer.compress(p) for p in parts]
    block = bytes(1 << 20)
    for _ in range(zeros >> 20):
        out.append(packer.compress(block))
    out.append(packer.flush())
    return b"".join(out)


def _peak_bytes(fn) -> tuple[int, str]:
    """Peak Python memory (tracemalloc) while ``fn`` runs; it must raise CorruptFileError."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(CorruptFileError) as info:
            fn()
        return tracemalloc.get_traced_memory()[1], str(info.value)
    finally:
        tracemalloc.stop()


def test_gzip_bomb_behind_a_small_header_is_refused_early(tmp_path):
    # a valid IDX header for 10 images, then 256 MiB of zeros: 1.2 MB on disk
    header = encode_idx(np.zeros((10, 28, 28), dtype=np.uint8))[:16]
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(_gzip_of([header], zeros=256 << 20))
    assert path.stat().st_size < 2 << 20
    peak, message = _peak_bytes(lambda: read_idx(path))
    assert peak < 8 << 20, peak  # the whole content would be 256 MiB
    assert "more than the 7856 bytes its IDX header declares" in message and "gzip bomb" in message


def test_gzip_whose_header_declares_too_much_is_refused_at_once(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = struct.pack(">BBBBIII", 0, 0, 8, 3, 4_000_000_000, 28, 28)  # declares 3.1 TB
    path.write_bytes(_gzip_of([header], zeros=64 << 20))
    peak, message = _peak_bytes(lambda: read_idx(path))
    assert peak < 8 << 20 and f"{1 << 28}-byte cap" in message


def test_gzip_of_zeros_without_a_header_is_refused_at_once(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(_gzip_of([], zeros=64 << 20))
    peak, message = _peak_bytes(lambda: read_idx(path))
    assert peak < 8 << 20 and "not an IDX file" in message


def test_cap_applies_to_uncompressed_files_and_gzip_alike(tmp_path):
    array = np.arange(600, dtype=np.uint8).reshape(6, 10, 10)
    raw, gz = tmp_path / "a-idx3-ubyte", tmp_path / "a-idx3-ubyte.gz"
    raw.write_bytes(encode_idx(array))
    gz.write_bytes(_gzip_of([encode_idx(array)]))
    for path in (raw, gz):
        assert read_idx(path, max_bytes=616).tolist() == array.tolist()  # 16-byte header + 600
        with pytest.raises(CorruptFileError, match="615-byte cap"):
            read_idx(path, max_bytes=615)


def test_two_gzip_members_are_read_like_gzip_does(tmp_path):
    data = encode_idx(np.arange(50, dtype=np.uint8))
    path = tmp_path / "b-idx1-ubyte.gz"
    path.write_bytes(_gzip_of([data[:20]]) + _gzip_of([data[20:]]))
    assert read_idx(path).tolist() == list(range(50))


def test_bomb_in_a_dataset_folder_is_reported(tmp_path, small_mnist):
    folder = small_mnist.write(tmp_path / "mnist")
    header = encode_idx(small_mnist.train_images)[:16]
    (folder / "train-images-idx3-ubyte.gz").write_bytes(_gzip_of([header], zeros=64 << 20))
    with pytest.raises(CorruptFileError, match="gzip bomb"):
        load_dataset("mnist", tmp_path)


def test_datasets_listing_verifies_the_files(tmp_path, small_mnist, capsys):
    folder = small_mnist.write(tmp_path / "mnist")
    assert {i.name: i.available for i in available_datasets(tmp_path)}["mnist"]
    bad = folder / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-3])  # truncated: present, but not the official file
    infos = {info.name: info for info in available_datasets(tmp_path)}
    assert not infos["mnist"].available
    assert infos["mnist"].location.startswith("corrupt:") and str(bad) in infos["mnist"].location
    assert {i.name: i.available for i in available_datasets(tmp_path, verify=False)}["mnist"]
    from fwdgrad import cli

    assert cli.main(["datasets", "--data-dir", str(tmp_path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("mnist "))
    assert "NOT available" in line and "corrupt" in line


def test_datasets_listing_verifies_cifar(tmp_path, small_cifar):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    (folder / "cifar-10-python.tar.gz").write_bytes(small_cifar.tarball)
    assert {i.name: i.available for i in available_datasets(tmp_path)}["cifar10"]
    (folder / "cifar-10-python.tar.gz").write_bytes(small_cifar.tarball[:-100])
    assert not {i.name: i.available for i in available_datasets(tmp_path)}["cifar10"]
