"""Shared test setup: where the real datasets live, and a throwaway decoded-data cache."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# The Makefile exports STEALGUARD_DATA=../shared/datasets; do the same for a bare `pytest`.
os.environ.setdefault("STEALGUARD_DATA", str(REPO.parent / "shared" / "datasets"))


@pytest.fixture(scope="session", autouse=True)
def _session_decoded_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Decoded datasets go to a per-session temp folder, never to the user's cache."""
    old = os.environ.get("STEALGUARD_CACHE")
    os.environ["STEALGUARD_CACHE"] = str(tmp_path_factory.mktemp("decoded"))
    yield
    if old is None:
        os.environ.pop("STEALGUARD_CACHE", None)
    else:
        os.environ["STEALGUARD_CACHE"] = old


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    8x8 models are fastest on one thread, and OpenMP spinning on a busy machine is not."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty decoded-data cache for one test."""
    path = tmp_path / "decoded-cache"
    monkeypatch.setenv("STEALGUARD_CACHE", str(path))
    return path


@pytest.fixture
def write_idx_gz() -> Callable[[Path, np.ndarray], Path]:
    """Write a uint8 array as a gzipped IDX file (magic 0x08<ndim>, big-endian sizes)."""

    def write(path: Path, array: np.ndarray) -> Path:
        array = np.ascontiguousarray(array, dtype=np.uint8)
        header = bytes([0, 0, 8, array.ndim]) + b"".join(
            int(d).to_bytes(4, "big") for d in array.shape
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(header + array.tobytes()))
        return path

    return write
