"""A disk cache of decoded datasets: uint8 .npy arrays plus a small JSON per (dataset, split).

Decoding 50,000 CIFAR JPEGs takes seconds; reading the decoded array back takes ~0.1 s.
Layout: `<cache dir>/<name>-<split>-<hash of source location>/`
    meta.json                 classes, mean, std, shapes, the source key, the array file names
    images-<token>.npy        uint8 (N, C, H, W)
    labels-<token>.npy        uint8 (N,) (int64 when there are more than 256 classes)

The source key lists each source file's path, size and mtime, so a changed source is rebuilt.
Writes are atomic: arrays go to temp files renamed into place, and meta.json, written last,
names the arrays of its own write, so a reader never pairs a meta with half-written arrays.
The cache never writes into the data root, which may be read-only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stealguard.data.base import ImageDataset

CACHE_VERSION = 1  # bump when a reader changes what it decodes: old entries then rebuild
_STALE_TEMP_S = 3600.0  # temp files older than this are leftovers of an interrupted write


def cache_dir() -> Path:
    """`$STEALGUARD_CACHE`, else the user cache dir (e.g. ~/.cache/stealguard/decoded)."""
    env = os.environ.get("STEALGUARD_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("stealguard")) / "decoded"


def source_key(files: Sequence[Path], extra: str = "") -> str:
    """A digest of each file's absolute path, size and mtime (plus `extra`, e.g. class names)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}\n{extra}\n".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def entry_dir(name: str, split: str, files: Sequence[Path]) -> Path:
    """The cache folder for one dataset split read from one place."""
    where = os.path.commonpath([os.path.abspath(f) for f in files])
    tag = hashlib.sha256(f"{name}\n{split}\n{where}".encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-40:]
    return cache_dir() / f"{slug}-{split}-{tag}"


def load_or_build(
    name: str, split: str, files: Sequence[Path], build: Callable[[], ImageDataset],
    *, extra: str = "",
) -> ImageDataset:
    """The cached dataset if its source key still matches, else `build()` and store it."""
    folder = entry_dir(name, split, files)
    key = source_key(files, extra)
    ds = load_entry(folder, key)
    if ds is None:
        ds = build()
        save_entry(folder, key, ds, files)
    return ds


def load_entry(folder: Path, key: str) -> ImageDataset | None:
    """The dataset stored in `folder`, or None when missing, stale or unreadable."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
            return None
        images = np.load(folder / meta["images"], allow_pickle=False)  # (N, C, H, W), in RAM
        labels = np.load(folder / meta["labels"], allow_pickle=False)  # (N,)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if images.dtype != np.uint8 or list(images.shape) != meta["shape"]:
        return None
    if labels.shape != (images.shape[0],):
        return None
    return ImageDataset(
        meta["name"], meta["split"], torch.from_numpy(images),
        torch.from_numpy(labels.astype(np.int64)), list(meta["classes"]),
        tuple(meta["mean"]), tuple(meta["std"]),
    )


def save_entry(folder: Path, key: str, ds: ImageDataset, files: Sequence[Path] = ()) -> None:
    """Store `ds` atomically; warn (do not fail) if the cache folder is not writable.

    `files` (the sources) are listed in meta.json for people reading it; `key` decides.
    """
    token = secrets.token_hex(6)
    label_dtype = np.uint8 if ds.num_classes <= 256 else np.int64
    meta: dict[str, Any] = {
        "version": CACHE_VERSION, "key": key, "name": ds.name, "split": ds.split,
        "classes": list(ds.classes), "mean": list(ds.mean), "std": list(ds.std),
        "shape": list(ds.images.shape),
        "images": f"images-{token}.npy", "labels": f"labels-{token}.npy",
        "sources": _describe(files),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / meta["images"], lambda f: np.save(f, ds.images.numpy()))
        labels = ds.labels.numpy().astype(label_dtype)
        _atomic_write(folder / meta["labels"], lambda f: np.save(f, labels))
        text = json.dumps(meta, indent=1).encode()
        _atomic_write(folder / "meta.json", lambda f: f.write(text))
        _remove_unreferenced(folder, keep={"meta.json", meta["images"], meta["labels"]})
    except OSError as err:
        warnings.warn(
            f"could not write the dataset cache in {folder}: {err}; set STEALGUARD_CACHE to a "
            f"writable folder to make later loads fast", stacklevel=3,
        )


def _describe(files: Sequence[Path], limit: int = 16) -> list[dict[str, Any]] | str:
    """Path, size and mtime of each source file (a count when there are many)."""
    if len(files) > limit:
        return f"{len(files)} files under {os.path.commonpath([str(f) for f in files])}"
    out = []
    for f in files:
        st = os.stat(f)
        out.append({"path": os.path.abspath(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _atomic_write(dest: Path, write: Callable[[Any], object]) -> None:
    """Write through a temp file in dest's folder, fsync, then rename over dest."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=dest.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_unreferenced(folder: Path, keep: set[str]) -> None:
    """Delete arrays of earlier writes and temp files left by interrupted ones."""
    now = time.time()
    for entry in os.scandir(folder):
        if entry.name in keep:
            continue
        if entry.name.startswith(".tmp-") and now - entry.stat().st_mtime < _STALE_TEMP_S:
            continue  # maybe another process writing right now
        Path(entry.path).unlink(missing_ok=True)


def clear_cache(name: str | None = None) -> int:
    """Delete cached entries (all, or those of one dataset name); returns how many."""
    root = cache_dir()
    if not root.is_dir():
        return 0
    removed = 0
    for entry in root.iterdir():
        meta = entry / "meta.json"
        if name is not None:
            try:
                if json.loads(meta.read_text()).get("name") != name:
                    continue
            except (OSError, ValueError):
                continue
        shutil.rmtree(entry, ignore_errors=True)
        removed += 1
    return removed
