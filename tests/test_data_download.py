"""Downloads against a local HTTP server on 127.0.0.1, and safe archive extraction; no other network."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from data_fixtures import local_http_server, make_cifar_files, make_idx_files, make_tar
from fwdgrad.data import RESOURCES, CorruptFileError, DownloadError, UnsafeArchiveError, load_dataset
from fwdgrad.data.download import download_file, fetch_resource, safe_extract_tar
from fwdgrad.data.resources import FileResource, md5_of_bytes

PAYLOAD = bytes(range(256)) * 300  # 76.8 kB, more than one read chunk


@pytest.fixture
def server():
    with local_http_server() as running:
        yield running


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_good_file_is_written_and_verified(tmp_path, server):
    server.files["blob.bin"] = PAYLOAD
    seen: list[tuple[int, int | None]] = []
    out = download_file(
        server.url + "blob.bin", tmp_path / "sub" / "blob.bin", md5=md5_of_bytes(PAYLOAD),
        progress=lambda done, total: seen.append((done, total)),
    )  # fmt: skip
    assert out.read_bytes() == PAYLOAD
    assert _leftovers(tmp_path / "sub") == ["blob.bin"]  # no temporary file left
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))


def test_bad_checksum_leaves_nothing(tmp_path, server):
    server.files["blob.bin"] = PAYLOAD
    with pytest.raises(CorruptFileError, match="md5") as info:
        download_file(server.url + "blob.bin", tmp_path / "blob.bin", md5=md5_of_bytes(b"something else"))
    assert str(tmp_path / "blob.bin") in str(info.value)
    assert _leftovers(tmp_path) == []


def test_truncated_file_fails_the_checksum_and_leaves_nothing(tmp_path, server):
    server.files["blob.bin"] = PAYLOAD[: len(PAYLOAD) // 3]  # the server itself has a short copy
    with pytest.raises(CorruptFileError):
        download_file(server.url + "blob.bin", tmp_path / "blob.bin", md5=md5_of_bytes(PAYLOAD))
    assert _leftovers(tmp_path) == []


def test_dropped_connection_leaves_nothing(tmp_path, server):
    server.files["blob.bin"] = PAYLOAD
    server.cut_short.add("blob.bin")  # announces the full length, sends half, closes
    with pytest.raises(DownloadError):
        download_file(server.url + "blob.bin", tmp_path / "blob.bin", md5=None)
    assert _leftovers(tmp_path) == []


def test_failed_download_keeps_the_previous_file(tmp_path, server):
    server.files["blob.bin"] = b"corrupted copy"
    (tmp_path / "blob.bin").write_bytes(b"old content")
    with pytest.raises(CorruptFileError):
        download_file(server.url + "blob.bin", tmp_path / "blob.bin", md5=md5_of_bytes(PAYLOAD))
    assert (tmp_path / "blob.bin").read_bytes() == b"old content"
    assert _leftovers(tmp_path) == ["blob.bin"]


def test_missing_url_is_a_download_error(tmp_path, server):
    with pytest.raises(DownloadError, match="404"):
        download_file(server.url + "nope.bin", tmp_path / "nope.bin", md5=None)
    assert _leftovers(tmp_path) == []


def test_fetch_resource_falls_back_to_the_next_mirror(tmp_path, server):
    server.files["good/blob.bin"] = PAYLOAD
    resource = FileResource("blob.bin", md5_of_bytes(PAYLOAD))
    path = fetch_resource(resource, tmp_path, [server.url + "bad/", server.url + "good/"], log=None)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == ["bad/blob.bin", "good/blob.bin"]


def test_fetch_resource_reports_every_failure(tmp_path, server):
    resource = FileResource("blob.bin", md5_of_bytes(PAYLOAD))
    with pytest.raises(DownloadError, match="by hand") as info:
        fetch_resource(resource, tmp_path, [server.url + "a/", server.url + "b/"], log=None)
    assert "a/blob.bin" in str(info.value) and "b/blob.bin" in str(info.value)


# ---------------------------------------------------------------- through load_dataset


def test_load_dataset_downloads_mnist_from_the_mirror(tmp_path, server, monkeypatch):
    files = make_idx_files()
    monkeypatch.setitem(RESOURCES, "mnist", files.resources("mnist"))
    server.files.update({f"mnist/{name}": data for name, data in files.gz.items()})
    ds = load_dataset("mnist", tmp_path, download=True, mirror=server.url + "mnist/")
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.source == str(tmp_path / "mnist")
    assert _leftovers(tmp_path / "mnist") == sorted(files.gz)
    requests = len(server.requests)
    load_dataset("mnist", tmp_path, download=True, mirror=server.url + "mnist/")  # already there
    assert len(server.requests) == requests


def test_load_dataset_without_download_never_fetches(tmp_path, server, monkeypatch):
    files = make_idx_files()
    monkeypatch.setitem(RESOURCES, "mnist", files.resources("mnist", base_url=server.url))
    server.files.update(files.gz)
    with pytest.raises(FileNotFoundError):
        load_dataset("mnist", tmp_path)
    assert server.requests == []


def test_load_dataset_rejects_a_bad_download(tmp_path, server, monkeypatch):
    files = make_idx_files()
    monkeypatch.setitem(RESOURCES, "mnist", files.resources("mnist"))
    server.files.update(files.gz)
    server.files["t10k-images-idx3-ubyte.gz"] = make_idx_files(seed=9).gz["t10k-images-idx3-ubyte.gz"]
    with pytest.raises(DownloadError, match="t10k-images"):
        load_dataset("mnist", tmp_path, download=True, mirror=server.url)
    assert "t10k-images-idx3-ubyte.gz" not in _leftovers(tmp_path / "mnist")


def test_load_dataset_downloads_and_extracts_cifar(tmp_path, server, monkeypatch):
    files = make_cifar_files()
    monkeypatch.setitem(RESOURCES, "cifar10", files.resources())
    server.files["cifar-10-python.tar.gz"] = files.tarball
    data_dir = tmp_path / "cifar10"  # its name is the dataset's: files go there directly
    ds = load_dataset("cifar10", data_dir, download=True, mirror=server.url)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.y_test.tolist() == files.y_test.tolist()
    assert _leftovers(data_dir) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_load_dataset_refuses_an_archive_escaping_its_folder(tmp_path, server, monkeypatch):
    evil = make_tar({"cifar-10-batches-py/data_batch_1": b"x", "../escaped.txt": b"pwned"})
    resources = make_cifar_files().resources()
    monkeypatch.setitem(
        RESOURCES,
        "cifar10",
        type(resources)("cifar10", (FileResource("cifar-10-python.tar.gz", md5_of_bytes(evil)),), ()),
    )
    server.files["cifar-10-python.tar.gz"] = evil
    data_dir = tmp_path / "data"
    with pytest.raises(UnsafeArchiveError, match=r"\.\./escaped\.txt"):
        load_dataset("cifar10", data_dir, download=True, mirror=server.url)
    assert not (tmp_path / "escaped.txt").exists() and not (data_dir / "escaped.txt").exists()
    assert _leftovers(data_dir / "cifar10") == ["cifar-10-python.tar.gz"]  # nothing extracted, no staging


# ---------------------------------------------------------------- safe_extract_tar


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize(
    "members, extra, reason",
    [
        ({"ok.txt": b"1", "a/../../up.txt": b"2"}, None, "outside"),
        ({"/tmp/abs.txt": b"1"}, None, "absolute"),
        ({"ok.txt": b"1"}, [_link("link", "/etc/passwd", tarfile.SYMTYPE)], "link"),
        ({"ok.txt": b"1"}, [_link("hard", "ok.txt", tarfile.LNKTYPE)], "link"),
        ({"ok.txt": b"1"}, [_link("fifo", "", tarfile.FIFOTYPE)], "not a regular file"),
    ],
)
def test_safe_extract_refuses_before_writing_anything(tmp_path, members, extra, reason):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(make_tar(members, extra=extra))
    target = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match=reason):
        safe_extract_tar(archive, target)
    assert _leftovers(target) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "out"]


def test_safe_extract_writes_nested_files(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(make_tar({"./top/inner/x.txt": b"hello", "top/y.txt": b"world"}))
    placed = safe_extract_tar(archive, tmp_path / "out")
    assert placed == [tmp_path / "out" / "top"]
    assert (tmp_path / "out/top/inner/x.txt").read_bytes() == b"hello"
    assert (tmp_path / "out/top/y.txt").read_bytes() == b"world"


def test_safe_extract_reports_a_truncated_archive(tmp_path):
    data = make_tar({"big.bin": bytes(200_000)})
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated"):
        safe_extract_tar(archive, tmp_path / "out")
    assert _leftovers(tmp_path / "out") == []


def test_uncompressed_tar_is_read_too(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("plain.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "a.tar").write_bytes(buffer.getvalue())
    safe_extract_tar(tmp_path / "a.tar", tmp_path / "out")
    assert (tmp_path / "out/plain.txt").read_bytes() == b"abc"


def test_download_larger_than_the_cap_is_refused_and_leaves_nothing(tmp_path, server):
    server.files["blob.bin"] = PAYLOAD
    with pytest.raises(DownloadError, match=r"larger than max_bytes=1000.*announces 76800 bytes"):
        download_file(server.url + "blob.bin", tmp_path / "blob.bin", md5=None, max_bytes=1000)
    assert _leftovers(tmp_path) == []


def test_download_without_a_length_is_cut_off_at_the_cap(tmp_path, server, monkeypatch):
    import http.client

    monkeypatch.setattr(http.client.HTTPMessage, "get", lambda self, key, default=None: default)  # no length
    server.files["blob.bin"] = PAYLOAD
    with pytest.raises(DownloadError, match=r"larger than max_bytes=70000; refused$"):
        download_file(server.url + "blob.bin", tmp_path / "blob.bin", md5=None, max_bytes=70_000)
    assert _leftovers(tmp_path) == []
    out = download_file(server.url + "blob.bin", tmp_path / "blob.bin", md5=None, max_bytes=len(PAYLOAD))
    assert out.read_bytes() == PAYLOAD


def test_downloaded_files_are_readable_by_all(tmp_path, server):
    import os
    import stat

    server.files["blob.bin"] = PAYLOAD
    old = os.umask(0o022)
    try:
        out = download_file(server.url + "blob.bin", tmp_path / "blob.bin", md5=md5_of_bytes(PAYLOAD))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
