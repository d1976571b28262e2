"""Download the public datasets from their official URLs, verified against published checksums.

    download_dataset("mnist")                    # into the data root, in the layout loaders read
    download_file(url, dest, md5="f68b3c2d...")  # one file: stream, verify, rename into place

The md5 values are the ones torchvision publishes. Every file is streamed to a temp file next to
its destination, hashed while it streams, and renamed into place only when the checksum
matches; on a mismatch the temp file is deleted and `ChecksumError` is raised, so a bad or
partial download never sits where a loader would trust it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stealguard.errors import StealguardError, UnknownNameError

CHUNK = 1 << 20


class DownloadError(StealguardError):
    """A file could not be fetched (HTTP error, no network, truncated transfer)."""


class ChecksumError(DownloadError):
    """A fetched file does not match its published checksum; it was deleted."""


@dataclass(frozen=True)
class Resource:
    """One file on the server and where it goes under the data root."""

    filename: str  # name on the server (appended to a mirror's base URL)
    md5: str
    dest: str  # path under the data root
    provides: tuple[str, ...] = ()  # files an unpack step makes; all present -> nothing to do
    unpack: Callable[[Path, Path], None] | None = None  # (downloaded file, data root)


@dataclass(frozen=True)
class RemoteDataset:
    mirrors: tuple[str, ...]  # base URLs, tried in order
    resources: tuple[Resource, ...]


def _raw(folder: str, files: Mapping[str, str]) -> tuple[Resource, ...]:
    return tuple(Resource(f, md5, f"{folder}/raw/{f}") for f, md5 in files.items())


def _extract_tar(archive: Path, root: Path) -> None:
    """Extract a .tar.gz under root, refusing members that would land outside it."""
    with tarfile.open(archive, "r:*") as tf:
        for m in tf.getmembers():
            target = (root / m.name).resolve()
            if not (m.isfile() or m.isdir()) or not target.is_relative_to(root.resolve()):
                raise DownloadError(f"{archive}: refusing unsafe member {m.name!r}")
        if hasattr(tarfile, "data_filter"):
            tf.extractall(root, filter="data")
        else:  # pragma: no cover - Python < 3.11.4; members checked above
            tf.extractall(root)


_EMNIST_LETTERS = tuple(
    f"emnist-letters-{s}-{kind}-ubyte.gz" for s in ("train", "test")
    for kind in ("images-idx3", "labels-idx1")
)


def _extract_emnist_letters(archive: Path, root: Path) -> None:
    """Copy the four letters files out of EMNIST's gzip.zip into EMNIST/raw/."""
    raw = root / "EMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        for fname in _EMNIST_LETTERS:
            fd, tmp = tempfile.mkstemp(dir=raw, prefix=f".{fname}.", suffix=".part")
            with os.fdopen(fd, "wb") as out, zf.open(f"gzip/{fname}") as src:
                shutil.copyfileobj(src, out, CHUNK)
            os.replace(tmp, raw / fname)


_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
REMOTE: dict[str, RemoteDataset] = {
    "mnist": RemoteDataset(_MNIST_MIRRORS, _raw("MNIST", {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    })),
    "fashionmnist": RemoteDataset(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",), _raw("FashionMNIST", {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        })),
    "kmnist": RemoteDataset(("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",), _raw("KMNIST", {
        "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
        "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
        "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
        "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
    })),
    "cifar10": RemoteDataset(("https://www.cs.toronto.edu/~kriz/",), (Resource(
        "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-python.tar.gz",
        provides=tuple(f"cifar-10-batches-py/{f}" for f in
                       ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]),
        unpack=_extract_tar,
    ),)),
    "cifar100": RemoteDataset(("https://www.cs.toronto.edu/~kriz/",), (Resource(
        "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python.tar.gz",
        provides=("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
        unpack=_extract_tar,
    ),)),
    "svhn": RemoteDataset(("http://ufldl.stanford.edu/housenumbers/",), (
        Resource("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373", "SVHN/train_32x32.mat"),
        Resource("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3", "SVHN/test_32x32.mat"),
    )),
    "emnist-letters": RemoteDataset(("https://biometrics.nist.gov/cs_links/EMNIST/",), (Resource(
        "gzip.zip", "58c8d27c78d21e728a6bc7b3cc06412e", "EMNIST/gzip.zip",
        provides=tuple(f"EMNIST/raw/{f}" for f in _EMNIST_LETTERS), unpack=_extract_emnist_letters,
    ),)),
}


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download_file(
    url: str, dest: str | Path, *, md5: str | None = None, sha256: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Fetch `url` to `dest`, verifying md5 and/or sha256; atomic (temp file, then rename).

    Raises DownloadError (HTTP error, unreachable host, truncated transfer) or ChecksumError;
    in both cases nothing is left at `dest` or in its folder.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    expected = {a: v.lower() for a, v in (("md5", md5), ("sha256", sha256)) if v}
    hashers = {a: hashlib.new(a, usedforsecurity=False) for a in expected}
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            _stream(url, out, hashers.values(), timeout)
        for algo, want in expected.items():
            got = hashers[algo].hexdigest()
            if got != want:
                raise ChecksumError(
                    f"{url}: {algo} mismatch (expected {want}, got {got}); the download was "
                    f"deleted. The file may have changed upstream or been corrupted in transit"
                )
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _stream(url: str, out: Any, hashers: Any, timeout: float) -> None:
    """Copy the response body of `url` to `out` in chunks, updating every hasher."""
    request = urllib.request.Request(url, headers={"User-Agent": "stealguard"})
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            while chunk := resp.read(CHUNK):
                out.write(chunk)
                received += len(chunk)
                for h in hashers:
                    h.update(chunk)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"{url}: could not download ({reason}); no network?") from None
    if length is not None and received != int(length):
        raise DownloadError(f"{url}: transfer truncated ({received} of {length} bytes)")


def download_dataset(
    name: str, root: str | Path | None = None, *, mirrors: Sequence[str] | None = None,
    checksums: Mapping[str, str] | None = None, timeout: float = 60.0,
) -> list[Path]:
    """Download dataset `name` into `root` (default: the data root) in the loaders' layout.

    mirrors: base URLs to try in order instead of the official ones (a file's URL is
    base + its official file name); checksums: md5 per file name, overriding the published
    values (for a mirror serving other bytes, e.g. a test fixture). Files already in place with
    the right checksum are not fetched again. Returns the paths in place.
    """
    from stealguard.data.loaders import resolve_data_root

    remote = REMOTE.get(name)
    if remote is None:
        raise UnknownNameError("downloadable dataset", name, sorted(REMOTE))
    base = resolve_data_root(root)
    bases = tuple(mirrors) if mirrors else remote.mirrors
    placed = []
    for res in remote.resources:
        md5 = (checksums or {}).get(res.filename, res.md5)
        placed.append(_fetch_resource(res, base, bases, md5, timeout))
    return placed


def _fetch_resource(res: Resource, root: Path, bases: Sequence[str], md5: str,
                    timeout: float) -> Path:
    """Fetch one resource from the first mirror that serves it correctly, then unpack it."""
    dest = root / res.dest
    if res.provides and all((root / p).is_file() for p in res.provides):
        return dest
    if not (dest.is_file() and file_digest(dest) == md5):
        errors = []
        for b in bases:
            url = b.rstrip("/") + "/" + res.filename
            try:
                download_file(url, dest, md5=md5, timeout=timeout)
                break
            except DownloadError as err:
                errors.append(str(err))
        else:
            tried = "\n  ".join(errors)
            raise DownloadError(
                f"could not fetch {res.filename} from any mirror:\n  {tried}\n"
                f"Alternatively, place the file (md5 {md5}) at {dest} yourself."
            )
    if res.unpack is not None:
        res.unpack(dest, root)
    return dest
