"""Downloads against a local HTTP server on 127.0.0.1 (the machines have no internet)."""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import socket
import tarfile
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from stealguard.data import DATASETS, load_dataset, resolve_data_root
from stealguard.data.download import (
    REMOTE,
    ChecksumError,
    DownloadError,
    download_dataset,
    download_file,
    file_digest,
)
from stealguard.errors import UnknownNameError

WriteIdx = Callable[[Path, np.ndarray], Path]


class _QuietHandler(SimpleHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, served folder): a threaded HTTP server on loopback, stopped after the test."""
    folder = tmp_path / "served"
    folder.mkdir()
    _QuietHandler.requests = []
    handler = functools.partial(_QuietHandler, directory=str(folder))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", folder
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_good_checksum_file_in_place(server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = server
    data = b"hello mnist" * 1000
    (served / "f.bin").write_bytes(data)
    dest = tmp_path / "out" / "f.bin"
    sha = hashlib.sha256(data).hexdigest()
    assert download_file(f"{base}/f.bin", dest, md5=_md5(data), sha256=sha, timeout=5) == dest
    assert dest.read_bytes() == data and _leftovers(dest.parent) == ["f.bin"]


@pytest.mark.parametrize("kind", ["md5", "sha256"])
def test_bad_checksum_refused_and_deleted(server: tuple[str, Path], tmp_path: Path,
                                          kind: str) -> None:
    base, served = server
    (served / "f.bin").write_bytes(b"tampered")
    dest = tmp_path / "out" / "f.bin"
    with pytest.raises(ChecksumError, match=f"{kind} mismatch"):
        download_file(f"{base}/f.bin", dest, timeout=5, **{kind: "0" * 32})
    assert _leftovers(dest.parent) == []


def test_404_is_a_clear_error(server: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = server
    dest = tmp_path / "out" / "missing.gz"
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download_file(f"{base}/missing.gz", dest, md5="0" * 32, timeout=5)
    assert f"{base}/missing.gz" in str(info.value) and _leftovers(dest.parent) == []


def test_unreachable_host_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="could not download"):
        download_file(f"http://127.0.0.1:{port}/x", tmp_path / "x", timeout=5)
    assert _leftovers(tmp_path) == []


def _serve_fake_mnist(served: Path, write_idx: WriteIdx) -> tuple[dict[str, str], np.ndarray]:
    """Tiny MNIST files under their official names; returns their md5s and the test images."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": np.arange(6) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": np.array([3, 1, 4, 1]),
    }
    for name, arr in arrays.items():
        write_idx(served / name, arr)
    md5s = {name: file_digest(served / name) for name in arrays}
    return md5s, arrays["t10k-images-idx3-ubyte.gz"]


def test_download_dataset_mnist_from_mirror_then_load(
    server: tuple[str, Path], tmp_path: Path, write_idx_gz: WriteIdx, data_cache: Path
) -> None:
    base, served = server
    md5s, test_images = _serve_fake_mnist(served, write_idx_gz)
    root = tmp_path / "data"
    dead = base + "/no-such-mirror"  # tried first, 404s, then the next mirror serves
    paths = download_dataset("mnist", root, mirrors=[dead, base], checksums=md5s, timeout=5)
    assert sorted(p.name for p in paths) == sorted(md5s)
    ds = load_dataset("mnist", "test", data_root=root)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(test_images))
    assert ds.labels.tolist() == [3, 1, 4, 1]
    count = len(_QuietHandler.requests)
    download_dataset("mnist", root, mirrors=[base], checksums=md5s, timeout=5)
    assert len(_QuietHandler.requests) == count  # already in place: nothing fetched


def test_download_dataset_all_mirrors_fail(server: tuple[str, Path], tmp_path: Path,
                                           write_idx_gz: WriteIdx) -> None:
    base, served = server
    _serve_fake_mnist(served, write_idx_gz)  # right names, but not the official bytes
    with pytest.raises(DownloadError, match="md5 mismatch") as info:
        download_dataset("mnist", tmp_path / "data", mirrors=[base], timeout=5)
    assert "place the file" in str(info.value)
    assert not list((tmp_path / "data").rglob("*.gz"))


def _cifar_python_targz(n: int = 3) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        names = ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]
        for name in names:
            body = {"data": np.full((n, 3072), len(name), np.uint8), "labels": [1] * n}
            data = pickle.dumps({"label_names": []} if name == "batches.meta" else body)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_download_dataset_cifar10_extracts_python_format(
    server: tuple[str, Path], tmp_path: Path, data_cache: Path
) -> None:
    base, served = server
    blob = _cifar_python_targz()
    (served / "cifar-10-python.tar.gz").write_bytes(blob)
    root = tmp_path / "data"
    download_dataset("cifar10", root, mirrors=[base],
                     checksums={"cifar-10-python.tar.gz": _md5(blob)}, timeout=5)
    ds = load_dataset("cifar10", "test", data_root=root)
    assert ds.images.shape == (3, 3, 32, 32) and ds.labels.tolist() == [1, 1, 1]


def test_download_dataset_refuses_unsafe_tar(server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = server
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    (served / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match="unsafe member"):
        download_dataset("cifar10", root, mirrors=[base],
                         checksums={"cifar-10-python.tar.gz": _md5(buf.getvalue())}, timeout=5)
    assert not (tmp_path / "escaped").exists()


def test_download_unknown_name() -> None:
    with pytest.raises(UnknownNameError, match="mnist"):
        download_dataset("mnits")


def test_every_registered_dataset_is_downloadable() -> None:
    assert set(DATASETS.names()) == set(REMOTE)
    for remote in REMOTE.values():
        assert remote.mirrors and all(u.startswith(("http://", "https://")) for u in remote.mirrors)
        for res in remote.resources:
            assert len(res.md5) == 32 and int(res.md5, 16) >= 0


@pytest.mark.parametrize("folder", ["MNIST", "FashionMNIST", "KMNIST"])
def test_published_md5s_match_the_shared_official_files(folder: str) -> None:
    """The shared IDX .gz files are byte-identical to the official ones (see their README)."""
    raw = resolve_data_root() / folder / "raw"
    if not raw.is_dir():
        pytest.skip(f"{raw} not present")
    name = {"MNIST": "mnist", "FashionMNIST": "fashionmnist", "KMNIST": "kmnist"}[folder]
    checked = 0
    for res in REMOTE[name].resources:
        path = resolve_data_root() / res.dest
        if path.is_file():
            assert file_digest(path) == res.md5, res.filename
            checked += 1
    assert checked >= 3
