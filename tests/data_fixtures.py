"""Small dataset files in the real formats, and a local HTTP server, for the fwdgrad.data tests.

Nothing here touches the network or /work/shared: the IDX and CIFAR files are a few random images, and
the server listens on 127.0.0.1 on a free port.
"""

from __future__ import annotations

import gzip
import http.server
import io
import pickle
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fwdgrad.data.cifar import CIFAR10_FILES
from fwdgrad.data.idx import encode_idx
from fwdgrad.data.resources import CIFAR10_FOLDER, DatasetResources, FileResource, md5_of_bytes

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass
class IdxFiles:
    """A small MNIST-format dataset: the arrays, the gzipped file bytes and a matching resources entry."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    gz: dict[str, bytes] = field(default_factory=dict)  # official .gz name -> bytes
    raw: dict[str, bytes] = field(default_factory=dict)  # uncompressed name -> bytes

    def resources(self, name: str = "mnist", base_url: str = "http://127.0.0.1:9/") -> DatasetResources:
        files = tuple(
            FileResource(f"{stem}.gz", md5_of_bytes(self.gz[f"{stem}.gz"]), md5_of_bytes(self.raw[stem]))
            for stem in IDX_NAMES
        )
        return DatasetResources(name=name, files=files, base_urls=(base_url,))

    def write(self, folder: Path, *, compressed: bool = True) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in (self.gz if compressed else self.raw).items():
            (folder / name).write_bytes(data)
        return folder


def make_idx_files(n_train: int = 20, n_test: int = 10, seed: int = 0) -> IdxFiles:
    """Random 28x28 uint8 images and labels 0..9 (every class present when n >= 10), as official IDX gz."""
    rng = np.random.default_rng(seed)
    files = IdxFiles(
        train_images=rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        train_labels=(np.arange(n_train) % 10).astype(np.uint8),
        test_images=rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        test_labels=(np.arange(n_test)[::-1] % 10).astype(np.uint8),
    )
    arrays = (files.train_images, files.train_labels, files.test_images, files.test_labels)
    for stem, array in zip(IDX_NAMES, arrays):
        raw = encode_idx(array)
        files.raw[stem] = raw
        files.gz[f"{stem}.gz"] = gzip.compress(raw, mtime=0)
    return files


@dataclass
class CifarFiles:
    """A small CIFAR-10-format tarball and the arrays it holds."""

    x_train: np.ndarray  # uint8 [n, 3, 32, 32]
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    batches: dict[str, bytes]
    tarball: bytes

    def resources(self, base_url: str = "http://127.0.0.1:9/") -> DatasetResources:
        return DatasetResources(
            name="cifar10",
            files=(FileResource("cifar-10-python.tar.gz", md5_of_bytes(self.tarball)),),
            base_urls=(base_url,),
            extracted_md5={name: md5_of_bytes(data) for name, data in self.batches.items()},
        )


def pickle_cifar_batch(images: np.ndarray, labels: np.ndarray) -> bytes:
    """A batch pickled like the official ones (protocol 2, bytes keys, ``data`` uint8 [n, 3072])."""
    batch = {
        b"batch_label": b"test batch",
        b"labels": [int(v) for v in labels],
        b"data": images.reshape(len(images), -1),
    }
    return pickle.dumps(batch, protocol=2)


def make_tar(members: dict[str, bytes], *, extra: list[tarfile.TarInfo] | None = None) -> bytes:
    """A gzipped tarball with the given regular files (and optional raw TarInfo entries, e.g. links)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return buffer.getvalue()


def make_cifar_files(per_batch: int = 4, n_test: int = 6, seed: int = 0) -> CifarFiles:
    """Five training batches of ``per_batch`` images and one test batch, tarred like the official archive."""
    rng = np.random.default_rng(seed)
    batches: dict[str, bytes] = {}
    xs, ys = [], []
    for name in CIFAR10_FILES:
        n = n_test if name == "test_batch" else per_batch
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n)
        batches[name] = pickle_cifar_batch(images, labels)
        xs.append(images)
        ys.append(labels)
    members = {f"{CIFAR10_FOLDER}/{name}": data for name, data in batches.items()}
    members[f"{CIFAR10_FOLDER}/batches.meta"] = pickle.dumps({b"label_names": [b"airplane"]}, protocol=2)
    return CifarFiles(
        x_train=np.concatenate(xs[:-1]),
        y_train=np.concatenate(ys[:-1]),
        x_test=xs[-1],
        y_test=ys[-1],
        batches=batches,
        tarball=make_tar(members),
    )


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; paths in ``server.cut_short`` announce the full length but send half."""

    def do_GET(self) -> None:
        path = self.path.lstrip("/")
        files: dict[str, bytes] = self.server.files  # type: ignore[attr-defined]
        self.server.requests.append(path)  # type: ignore[attr-defined]
        if path not in files:
            self.send_error(404, "not found")
            return
        data = files[path]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if path in self.server.cut_short:  # type: ignore[attr-defined]
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass


@dataclass
class LocalServer:
    """A running server: put bytes in ``files`` (path -> bytes); ``url`` is the base URL."""

    url: str
    files: dict[str, bytes]
    cut_short: set[str]
    requests: list[str]


@contextmanager
def local_http_server() -> Iterator[LocalServer]:
    """An HTTP server on 127.0.0.1 (free port) in a daemon thread, shut down on exit."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.files = {}  # type: ignore[attr-defined]
    server.cut_short = set()  # type: ignore[attr-defined]
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield LocalServer(f"http://{host}:{port}/", server.files, server.cut_short, server.requests)  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
