"""File-format readers: IDX (MNIST family), CIFAR python pickles, JPEG/PNG trees and tars, SVHN .mat.

Every reader returns numpy arrays: images uint8 (N, C, H, W) and labels int64 (N,). A file that
is short, corrupt or of the wrong kind raises `InputError` naming the file; a missing file is the
caller's business (the loaders know which path to suggest).
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import importlib
import io
import mmap
import multiprocessing
import os
import pickle
import sys
import tarfile
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from stealguard.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST, KMNIST, EMNIST)
# ---------------------------------------------------------------------------------------------


def read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when the name ends in .gz."""
    raw = path.read_bytes()
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise InputError(f"{path}: not a valid gzip file ({err}); delete it and fetch it again")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes with `ndim` dimensions (3 for images, 1 for labels).

    Header: two zero bytes, type code 0x08 (ubyte), ndim, then ndim big-endian uint32 sizes.
    """
    data = read_bytes(path)
    expected_magic = 0x0800 | ndim  # 0x0803 images, 0x0801 labels
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise InputError(f"{path}: IDX file too short ({len(data)} bytes) for its header")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise InputError(
            f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"({'images' if ndim == 3 else 'labels'} file)"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(dims))
    if len(data) - header_len != count:
        raise InputError(
            f"{path}: IDX header says {dims} = {count} bytes of data, file has "
            f"{len(data) - header_len}; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


# ---------------------------------------------------------------------------------------------
# CIFAR python format: pickles, read with an allow-list unpickler
# ---------------------------------------------------------------------------------------------


def _numpy_reconstruct() -> Any:
    """numpy's array-unpickling helper (moved to numpy._core in numpy 2)."""
    module = "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"
    return importlib.import_module(module)._reconstruct


# The only globals a CIFAR pickle needs: numpy arrays (reconstruct + ndarray + dtype), and
# _codecs.encode, which protocol-2 pickles written by Python 3 use for bytes.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("_codecs", "encode"): codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, strings, numbers and numpy arrays.

    `pickle.load` runs any callable a file names (os.system, eval, ...); this one refuses every
    global outside a short allow-list, so a crafted "dataset" cannot run code.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise InputError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays and plain "
                f"containers are allowed in dataset files"
            ) from None


def load_restricted_pickle(path: Path) -> Any:
    """Unpickle a dataset file with `RestrictedUnpickler` (latin1 reads Python 2 pickles)."""
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, encoding="latin1").load()
        except InputError as err:
            raise InputError(f"{path}: {err}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            raise InputError(f"{path}: not a readable CIFAR pickle ({err})") from None


def read_cifar_pickles(paths: Sequence[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) and labels (N,) from CIFAR batch pickles, concatenated in order."""
    images, labels = [], []
    for path in paths:
        batch = load_restricted_pickle(path)
        if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
            raise InputError(f"{path}: expected a dict with 'data' and {label_key!r}")
        data = np.asarray(batch["data"], dtype=np.uint8)  # (n, 3072): R plane, G plane, B plane
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise InputError(f"{path}: 'data' has shape {data.shape}, expected (n, 3072)")
        y = np.asarray(batch[label_key], dtype=np.int64)
        if y.shape != (data.shape[0],):
            raise InputError(f"{path}: {data.shape[0]} images but {y.shape} labels")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


# ---------------------------------------------------------------------------------------------
# Encoded images (JPEG/PNG) in a tar or a folder tree, decoded in parallel
# ---------------------------------------------------------------------------------------------


class Blob(NamedTuple):
    """One encoded image: `size` bytes at `offset` in `path` (size -1: the whole file)."""

    path: str
    offset: int
    size: int
    name: str  # for error messages, e.g. "cifar10-jpg.tar::train/cat/0001.jpg"


class _NotPlainUstar(Exception):
    """The tar uses features the fast scanner does not read (pax, GNU long names)."""


def tar_members(path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files in an uncompressed tar.

    Plain ustar archives are scanned header by header through mmap (~10x faster than
    `tarfile` on 60k members); anything else falls back to `tarfile`.
    """
    try:
        return _scan_ustar(path)
    except _NotPlainUstar:
        pass
    try:
        with tarfile.open(path) as tf:
            return [(m.name, m.offset_data, m.size) for m in tf.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError) as err:
        raise InputError(f"{path}: not a readable tar archive ({err})") from None


def _scan_ustar(path: Path) -> list[tuple[str, int, int]]:
    members: list[tuple[str, int, int]] = []
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise InputError(f"{path}: empty file, expected a tar archive")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos, end = 0, len(mm)
            while pos + 512 <= end:
                header = mm[pos : pos + 512]
                if header.count(0) == 512:  # end-of-archive marker
                    return members
                name, size, regular = _parse_ustar_header(header, path)
                if regular:
                    members.append((name, pos + 512, size))
                pos += 512 + (size + 511) // 512 * 512
            if pos > end:
                raise InputError(f"{path}: tar archive is truncated")
    return members


def _parse_ustar_header(header: bytes, path: Path) -> tuple[str, int, bool]:
    if header[257:262] != b"ustar":
        raise _NotPlainUstar
    stored = header[148:156].rstrip(b"\0 ")
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])  # chksum field counts as spaces
    if not stored or int(stored, 8) != computed:
        raise InputError(f"{path}: tar header checksum mismatch; the archive is corrupt")
    flag = header[156:157]
    if flag not in (b"0", b"\0", b"5") or header[124] & 0x80:
        raise _NotPlainUstar  # pax/GNU headers, links, base-256 sizes
    size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
    name = header[0:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    full = (prefix + b"/" + name) if prefix else name
    return full.decode("utf-8"), size, flag != b"5"


def scan_image_folder(folder: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files, labels and classes of a `<folder>/<class>/<image>` tree (classes sorted = labels)."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        names = sorted(
            e.name for e in os.scandir(folder / cls)
            if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)
        )
        files += [folder / cls / n for n in names]
        labels += [label] * len(names)
    return files, np.asarray(labels, dtype=np.int64), classes


def probe_mode(blob: Blob) -> str:
    """"L" if this image is grayscale, else "RGB" (a dataset's images all convert to one mode)."""
    with contextlib.ExitStack() as stack:
        mode = _open_image(blob, {}, stack).mode
    return "L" if mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"


def decode_images(blobs: Sequence[Blob], mode: str = "RGB") -> np.ndarray:
    """Decode encoded images to uint8 (N, C, H, W); all must share one size.

    Large batches are split across worker processes (fork, Linux only): Pillow spends most of
    a 32x32 JPEG's ~80 us in Python, so threads do not help but processes do.
    """
    if not blobs:
        raise InputError("no images to decode")
    workers = _decode_workers(len(blobs))
    if workers <= 1:
        out = _decode_chunk(list(blobs), mode)
    else:
        step = -(-len(blobs) // (workers * 4))  # 4 chunks per worker evens out the load
        chunks = [list(blobs[i : i + step]) for i in range(0, len(blobs), step)]
        ctx = multiprocessing.get_context("fork")
        with warnings.catch_warnings():  # 3.12+ warns about fork in a threaded process
            warnings.simplefilter("ignore", DeprecationWarning)
            with ctx.Pool(workers) as pool:
                parts = pool.starmap(_decode_chunk, [(c, mode) for c in chunks])
        _check_same_size(parts, blobs)
        out = np.concatenate(parts)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))  # (N, H, W, C) -> (N, C, H, W)


def _decode_workers(n: int) -> int:
    """How many processes decode n images: $STEALGUARD_DECODE_WORKERS, else up to 8 on Linux."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    env = os.environ.get("STEALGUARD_DECODE_WORKERS", "")
    if env.strip().isdigit():  # 1: decode in this process only
        return max(1, int(env))
    if n < 4096 or not sys.platform.startswith("linux"):
        return 1
    return min(8, len(os.sched_getaffinity(0)))


def _decode_chunk(blobs: list[Blob], mode: str) -> np.ndarray:
    """Decode blobs in order to (n, H, W, C) uint8, reading each file through one handle."""
    with contextlib.ExitStack() as stack:
        handles: dict[str, int] = {}
        first = _to_array(_open_image(blobs[0], handles, stack), mode)
        out = np.empty((len(blobs), *first.shape), dtype=np.uint8)
        out[0] = first
        for i in range(1, len(blobs)):
            arr = _to_array(_open_image(blobs[i], handles, stack), mode)
            if arr.shape != first.shape:
                raise InputError(
                    f"{blobs[i].name}: image is {arr.shape[1]}x{arr.shape[0]}, but "
                    f"{blobs[0].name} is {first.shape[1]}x{first.shape[0]}; all images of a "
                    f"dataset must have one size (resize them first)"
                )
            out[i] = arr
        return out


def _open_image(blob: Blob, handles: dict[str, int], stack: contextlib.ExitStack) -> Any:
    """The decoded PIL image of one blob; `handles` keeps one open descriptor per path."""
    from PIL import Image, UnidentifiedImageError

    fd = handles.get(blob.path)
    if fd is None:
        fd = handles[blob.path] = os.open(blob.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        stack.callback(os.close, fd)
    size = os.fstat(fd).st_size if blob.size < 0 else blob.size
    os.lseek(fd, blob.offset, os.SEEK_SET)
    data = os.read(fd, size)
    if len(data) != size:
        raise InputError(f"{blob.name}: file is truncated ({len(data)} of {size} bytes)")
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise InputError(f"{blob.name}: cannot decode image ({err})") from None
    return im


def _to_array(im: Any, mode: str) -> np.ndarray:
    if im.mode != mode:
        im = im.convert(mode)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr  # (H, W, C)


def _check_same_size(parts: list[np.ndarray], blobs: Sequence[Blob]) -> None:
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise InputError(
            f"images of several sizes {sorted(shapes)} among {blobs[0].name} ...; all images "
            f"of a dataset must have one size (resize them first)"
        )


# ---------------------------------------------------------------------------------------------
# SVHN .mat
# ---------------------------------------------------------------------------------------------


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN cropped digits: X (32, 32, 3, N) -> (N, 3, 32, 32); labels 1..10 with 10 = digit 0."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except (ValueError, OSError, TypeError) as err:
        raise InputError(f"{path}: not a readable .mat file ({err})") from None
    if "X" not in mat or "y" not in mat:
        raise InputError(f"{path}: expected variables 'X' and 'y', found {sorted(mat)}")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.shape[0]:
        raise InputError(f"{path}: X has shape {x.shape}, y {y.shape}; expected (32,32,3,N), (N,)")
    images = np.ascontiguousarray(x.astype(np.uint8).transpose(3, 2, 0, 1))  # (N, C, H, W)
    return images, np.where(y == 10, 0, y)
