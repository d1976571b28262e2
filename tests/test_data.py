"""Dataset layer: every registered loader, the file formats, the decoded-data cache."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from stealguard.data import DATASETS, formats, load_dataset, resolve_data_root
from stealguard.data import cache as data_cache_mod
from stealguard.data.loaders import DATASET_INFO, FileLoader, dataset_shape, get_loader
from stealguard.errors import DatasetNotFoundError, InputError, UnknownNameError

WriteIdx = Callable[[Path, np.ndarray], Path]

# Datasets the shared data root lacks on purpose (see shared/datasets/README.md).
MISSING_IN_SHARED = {"svhn", "emnist-letters"}
CIFAR10_CLASSES = list(DATASET_INFO["cifar10"].classes)


def shared_root() -> Path:
    root = resolve_data_root()
    if not (root / "MNIST").is_dir():
        pytest.skip(f"shared datasets not found at {root} (set STEALGUARD_DATA)")
    return root


# ---- names, roots, shapes ---------------------------------------------------------------------


def test_resolve_data_root_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STEALGUARD_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_root() == tmp_path / "env"
    monkeypatch.delenv("STEALGUARD_DATA")
    default = resolve_data_root()
    assert default.name == "datasets" and "stealguard" in str(default)


def test_registered_names() -> None:
    expected = {"mnist", "fashionmnist", "kmnist", "cifar10", "cifar100", "svhn", "emnist-letters"}
    assert expected <= set(DATASETS.names())
    assert set(DATASETS.names()) <= set(DATASET_INFO)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="imagefolder:<path>") as info:
        load_dataset("mnits", "test")
    assert "mnist" in str(info.value) and "cifar10" in str(info.value)
    with pytest.raises(UnknownNameError):
        dataset_shape("mnits")


def test_bad_split() -> None:
    with pytest.raises(InputError, match="valid splits: train, test"):
        load_dataset("mnist", "val")


def test_dataset_shape_table() -> None:
    assert dataset_shape("mnist") == (1, 28, 10)
    assert dataset_shape("cifar100") == (3, 32, 100)
    assert dataset_shape("emnist-letters") == (1, 28, 26)
    with pytest.raises(InputError):
        dataset_shape("imagefolder:/x")


# ---- contract over every registered name, on the shared data ----------------------------------


@pytest.mark.parametrize("name", DATASETS.names())
def test_registered_dataset_contract(name: str) -> None:
    root = shared_root()
    if name in MISSING_IN_SHARED:
        with pytest.raises(DatasetNotFoundError) as info:
            load_dataset(name, "test")
        assert str(root) in str(info.value) and "stealguard data download" in str(info.value)
        return
    ds = load_dataset(name, "test")
    c, size, k = dataset_shape(name)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (10_000, c, size, size)
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (10_000,)
    assert int(ds.labels.min()) >= 0 and int(ds.labels.max()) == k - 1
    assert len(ds.classes) == k == ds.num_classes
    assert len(ds.mean) == len(ds.std) == c
    assert (ds.name, ds.split) == (name, "test")
    assert 20 < float(ds.images.float().mean()) < 200  # real pixels, not zeros


def test_mnist_label_counts_match_readme() -> None:
    shared_root()
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    assert train.labels.bincount().tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert test.labels.bincount().tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert train.classes == [str(i) for i in range(10)] and train.mean == (0.1307,)


def test_kmnist_train_missing_is_explained() -> None:
    root = shared_root()
    with pytest.raises(DatasetNotFoundError, match="KMNIST train images are missing") as info:
        load_dataset("kmnist", "train")
    msg = str(info.value)
    assert str(root / "KMNIST" / "raw" / "train-images-idx3-ubyte.gz") in msg
    assert "only the test split" in msg and "stealguard data download kmnist" in msg


def test_cifar100_tar_classes_are_fine_labels() -> None:
    shared_root()
    ds = load_dataset("cifar100", "test")
    assert ds.classes[:3] == ["apple", "aquarium_fish", "baby"]
    assert ds.labels.bincount().tolist() == [100] * 100


@pytest.mark.slow
def test_real_cifar10_train_full_decode(data_cache: Path) -> None:
    shared_root()
    ds = load_dataset("cifar10", "train")
    assert ds.images.shape == (50_000, 3, 32, 32) and ds.classes == CIFAR10_CLASSES
    assert ds.labels.bincount().tolist() == [5000] * 10
    again = load_dataset("cifar10", "train")
    assert torch.equal(again.images, ds.images) and torch.equal(again.labels, ds.labels)


# ---- IDX ------------------------------------------------------------------------------------


def _fake_mnist(raw: Path, write_idx: WriteIdx, n: int = 12, seed: int = 0,
                prefix: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return images, labels


def test_idx_roundtrip_and_uncompressed(tmp_path: Path, write_idx_gz: WriteIdx) -> None:
    raw = tmp_path / "MNIST" / "raw"
    images, labels = _fake_mnist(raw, write_idx_gz)
    ds = load_dataset("mnist", "test", data_root=tmp_path, cache=False)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
    for f in raw.glob("*.gz"):  # the same files, gunzipped, are read too
        f.with_suffix("").write_bytes(formats.read_bytes(f))
        f.unlink()
    assert torch.equal(load_dataset("mnist", "test", data_root=tmp_path, cache=False).images,
                       ds.images)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-100], "truncated or corrupt"),
    (lambda b: b"\x00\x00\x08\x01" + b[4:], "bad IDX magic"),
    (lambda b: b[:6], "too short"),
])
def test_corrupt_idx_names_file(tmp_path: Path, write_idx_gz: WriteIdx,
                                damage: Callable[[bytes], bytes], message: str) -> None:
    raw = tmp_path / "MNIST" / "raw"
    _fake_mnist(raw, write_idx_gz)
    path = raw / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(__import__("gzip").compress(damage(formats.read_bytes(path))))
    with pytest.raises(InputError, match=message) as info:
        load_dataset("mnist", "test", data_root=tmp_path, cache=False)
    assert str(path) in str(info.value)


def test_corrupt_gzip_names_file(tmp_path: Path, write_idx_gz: WriteIdx) -> None:
    raw = tmp_path / "MNIST" / "raw"
    _fake_mnist(raw, write_idx_gz)
    path = raw / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(InputError, match="not a valid gzip file") as info:
        load_dataset("mnist", "test", data_root=tmp_path, cache=False)
    assert str(path) in str(info.value)


def test_missing_mnist_names_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", "train", data_root=tmp_path / "nowhere")
    msg = str(info.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz") in msg
    assert "does not exist" in msg and "stealguard data download mnist" in msg


def test_emnist_letters_transposed_and_shifted(tmp_path: Path, write_idx_gz: WriteIdx) -> None:
    raw = tmp_path / "EMNIST" / "raw"
    stored = np.zeros((2, 28, 28), dtype=np.uint8)
    stored[:, 0, 5] = 255  # stored transposed: row 0, col 5 is really row 5, col 0
    write_idx_gz(raw / "emnist-letters-test-images-idx3-ubyte.gz", stored)
    write_idx_gz(raw / "emnist-letters-test-labels-idx1-ubyte.gz", np.array([1, 26]))
    ds = load_dataset("emnist-letters", "test", data_root=tmp_path, cache=False)
    assert ds.labels.tolist() == [0, 25] and ds.classes[0] == "a" and ds.classes[-1] == "z"
    assert ds.images[0, 0, 5, 0] == 255 and ds.images[0, 0, 0, 5] == 0


# ---- SVHN -----------------------------------------------------------------------------------


def test_svhn_mat(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [2], [10], [9]], dtype=np.uint8)
    (tmp_path / "SVHN").mkdir()
    scipy.io.savemat(tmp_path / "SVHN" / "test_32x32.mat", {"X": x, "y": y})
    ds = load_dataset("svhn", "test", data_root=tmp_path, cache=False)
    assert ds.labels.tolist() == [0, 1, 2, 0, 9]
    assert ds.images.shape == (5, 3, 32, 32)
    assert torch.equal(ds.images[2], torch.from_numpy(x[:, :, :, 2].transpose(2, 0, 1).copy()))


# ---- CIFAR: JPEG tar, extracted JPEG tree, python pickles ---------------------------------------


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _synthetic_cifar_members(per_class: int = 2) -> dict[str, bytes]:
    """{"train/<class>/000i.jpg": jpeg bytes} for both splits, classes in reverse order."""
    members = {}
    for split in ("train", "test"):
        for ci, cls in enumerate(reversed(CIFAR10_CLASSES)):
            for i in range(per_class):
                members[f"{split}/{cls}/{i:04d}.jpg"] = _jpeg(1000 * (split == "test") + 10 * ci + i)
    return members


def _write_tar(path: Path, members: dict[str, bytes], fmt: int = tarfile.USTAR_FORMAT) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _expected(members: dict[str, bytes], split: str) -> tuple[torch.Tensor, list[int]]:
    """Reference decode: sorted by (class, file), one PIL decode per member."""
    keys = sorted((k.split("/")[1], k) for k in members if k.startswith(split + "/"))
    images = np.stack([np.asarray(Image.open(io.BytesIO(members[k])).convert("RGB"))
                       for _, k in keys])
    labels = [CIFAR10_CLASSES.index(c) for c, _ in keys]
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), labels


def test_cifar_jpeg_tar(tmp_path: Path) -> None:
    members = _synthetic_cifar_members()
    _write_tar(tmp_path / "CIFAR10-jpg" / "cifar10-jpg.tar", members)
    ds = load_dataset("cifar10", "train", data_root=tmp_path, cache=False)
    images, labels = _expected(members, "train")
    assert torch.equal(ds.images, images) and ds.labels.tolist() == labels
    assert ds.classes == CIFAR10_CLASSES and ds.labels.tolist()[:2] == [0, 0]


def test_cifar_tar_parallel_decode_equals_serial(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    members = _synthetic_cifar_members()
    _write_tar(tmp_path / "CIFAR10-jpg" / "cifar10-jpg.tar", members)
    serial = load_dataset("cifar10", "test", data_root=tmp_path, cache=False)
    monkeypatch.setenv("STEALGUARD_DECODE_WORKERS", "2")
    parallel = load_dataset("cifar10", "test", data_root=tmp_path, cache=False)
    assert torch.equal(serial.images, parallel.images)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_members_matches_tarfile(tmp_path: Path, fmt: int) -> None:
    members = {"a/b.jpg": b"xyz", "train/" + "x" * 120 + "/1.jpg": b"12345", "c": b""}
    if fmt == tarfile.USTAR_FORMAT:
        members.pop("train/" + "x" * 120 + "/1.jpg")
    path = tmp_path / "t.tar"
    _write_tar(path, members, fmt)
    with tarfile.open(path) as tf:
        expected = [(m.name, m.offset_data, m.size) for m in tf.getmembers() if m.isfile()]
    assert formats.tar_members(path) == expected


def test_corrupt_tar_is_input_error(tmp_path: Path) -> None:
    path = tmp_path / "CIFAR10-jpg" / "cifar10-jpg.tar"
    _write_tar(path, _synthetic_cifar_members(1))
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF  # breaks the first header's checksum
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="cifar10-jpg.tar"):
        load_dataset("cifar10", "test", data_root=tmp_path, cache=False)


def test_cifar_extracted_tree_preferred_and_equal(tmp_path: Path) -> None:
    members = _synthetic_cifar_members()
    _write_tar(tmp_path / "CIFAR10-jpg" / "cifar10-jpg.tar", members)
    for name, data in members.items():
        (tmp_path / "CIFAR10-jpg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "CIFAR10-jpg" / name).write_bytes(data)
    loader = get_loader("cifar10")
    assert isinstance(loader, FileLoader) and loader.sources(tmp_path, "test").kind == "tree"
    ds = load_dataset("cifar10", "test", data_root=tmp_path, cache=False)
    images, labels = _expected(members, "test")
    assert torch.equal(ds.images, images) and ds.labels.tolist() == labels


def test_cifar_tree_with_wrong_classes(tmp_path: Path) -> None:
    (tmp_path / "CIFAR10-jpg" / "test" / "kitten").mkdir(parents=True)
    (tmp_path / "CIFAR10-jpg" / "test" / "kitten" / "0.jpg").write_bytes(_jpeg(0))
    with pytest.raises(InputError, match="class folders do not match"):
        load_dataset("cifar10", "test", data_root=tmp_path, cache=False)


def _write_cifar_python(root: Path, n: int = 4, protocol: int = 2) -> dict[str, np.ndarray]:
    """cifar-10-batches-py with n images per batch; returns the rows written, per file."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        (folder / fname).write_bytes(pickle.dumps(
            {"batch_label": fname, "labels": labels, "data": data}, protocol=protocol))
        written[fname] = data
        written[fname + ":labels"] = np.array(labels)
    return written


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_python_format(tmp_path: Path, protocol: int) -> None:
    written = _write_cifar_python(tmp_path, protocol=protocol)
    ds = load_dataset("cifar10", "train", data_root=tmp_path, cache=False)
    assert ds.images.shape == (20, 3, 32, 32)
    first = written["data_batch_1"].reshape(-1, 3, 32, 32)
    assert torch.equal(ds.images[:4], torch.from_numpy(first))
    assert ds.labels[16:].tolist() == written["data_batch_5:labels"].tolist()


def test_cifar100_python_format_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(2 * 3072, dtype=np.uint64).astype(np.uint8).reshape(2, 3072)
    (folder / "test").write_bytes(pickle.dumps(
        {"data": data, "fine_labels": [99, 3], "coarse_labels": [1, 2]}, protocol=2))
    ds = load_dataset("cifar100", "test", data_root=tmp_path, cache=False)
    assert ds.labels.tolist() == [99, 3] and ds.classes[99] == "worm"


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    _write_cifar_python(tmp_path)
    marker = tmp_path / "pwned"
    payload = {"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": _Evil(marker)}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(payload))
    with pytest.raises(InputError, match=r"refusing to unpickle global (posix|nt)\.system"):
        load_dataset("cifar10", "test", data_root=tmp_path, cache=False)
    assert not marker.exists()


def test_restricted_unpickler_refuses_builtins_eval(tmp_path: Path) -> None:
    path = tmp_path / "evil"
    path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(InputError, match="builtins.eval"):
        formats.load_restricted_pickle(path)


def test_cifar_missing_lists_all_three_formats(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", "test", data_root=tmp_path)
    msg = str(info.value)
    for part in ("CIFAR10-jpg/test", "CIFAR10-jpg/cifar10-jpg.tar", "cifar-10-batches-py"):
        assert str(tmp_path / part) in msg
    assert "stealguard data download cifar10" in msg


# ---- imagefolder:<path> ---------------------------------------------------------------------


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_imagefolder_split_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pics = {f"{s}/{c}/{i}.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            for s, c, i in [("train", "cat", 0), ("train", "cat", 1), ("train", "dog", 0),
                            ("test", "dog", 0), ("test", "emu", 0)]}
    for name, arr in pics.items():
        _png(tmp_path / "pics" / name, arr)
    ds = load_dataset(f"imagefolder:{tmp_path / 'pics'}", "test", cache=False)
    assert ds.classes == ["cat", "dog", "emu"]  # union over splits keeps labels aligned
    assert ds.labels.tolist() == [1, 2] and ds.images.shape == (2, 3, 8, 8)
    assert torch.equal(ds.images[1], torch.from_numpy(pics["test/emu/0.png"].transpose(2, 0, 1)))
    train = load_dataset(f"imagefolder:{tmp_path / 'pics'}", "train", cache=False)
    assert train.labels.tolist() == [0, 0, 1]


def test_imagefolder_flat_grayscale(tmp_path: Path) -> None:
    for c in ("a", "b"):
        _png(tmp_path / c / "x.png", np.full((5, 5), 7 if c == "a" else 9, dtype=np.uint8))
    ds = load_dataset(f"imagefolder:{tmp_path}", "train", cache=False)
    assert ds.images.shape == (2, 1, 5, 5) and ds.images[:, 0, 0, 0].tolist() == [7, 9]
    assert ds.mean == (0.5,)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="nope"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}", "train")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="test"):
        load_dataset(f"imagefolder:{tmp_path}", "test")
    _png(tmp_path / "train" / "a" / "1.png", np.zeros((4, 4, 3), np.uint8))
    _png(tmp_path / "train" / "a" / "2.png", np.zeros((6, 6, 3), np.uint8))
    with pytest.raises(InputError, match="one size"):
        load_dataset(f"imagefolder:{tmp_path}", "train", cache=False)


# ---- cache ----------------------------------------------------------------------------------


def test_cache_second_load_equal_and_from_cache(
    tmp_path: Path, write_idx_gz: WriteIdx, data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_mnist(tmp_path / "MNIST" / "raw", write_idx_gz)
    first = load_dataset("mnist", "test", data_root=tmp_path)
    entries = list(data_cache.iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    assert not list((tmp_path / "MNIST").rglob("*.npy"))  # nothing written into the data root

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(formats, "read_idx", fail)
    second = load_dataset("mnist", "test", data_root=tmp_path)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert (second.classes, second.mean, second.std) == (first.classes, first.mean, first.std)
    second.images[0, 0, 0, 0] = 1  # cached tensors are writable memory of their own


def test_stale_cache_is_rebuilt(tmp_path: Path, write_idx_gz: WriteIdx, data_cache: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    _fake_mnist(raw, write_idx_gz, seed=0)
    old = load_dataset("mnist", "test", data_root=tmp_path)
    images, _ = _fake_mnist(raw, write_idx_gz, seed=1)
    stat = (raw / "t10k-images-idx3-ubyte.gz").stat()
    os.utime(raw / "t10k-images-idx3-ubyte.gz", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    new = load_dataset("mnist", "test", data_root=tmp_path)
    assert not torch.equal(new.images, old.images)
    assert torch.equal(new.images[:, 0], torch.from_numpy(images))
    assert len(list(next(data_cache.iterdir()).glob("*.npy"))) == 2  # old arrays removed


def test_corrupt_cache_file_is_rebuilt(tmp_path: Path, write_idx_gz: WriteIdx,
                                       data_cache: Path) -> None:
    _fake_mnist(tmp_path / "MNIST" / "raw", write_idx_gz)
    first = load_dataset("mnist", "test", data_root=tmp_path)
    npy = next(next(data_cache.iterdir()).glob("images-*.npy"))
    npy.write_bytes(npy.read_bytes()[:200])
    assert torch.equal(load_dataset("mnist", "test", data_root=tmp_path).images, first.images)


def test_interrupted_cache_write_leaves_nothing_trusted(
    tmp_path: Path, write_idx_gz: WriteIdx, data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_mnist(tmp_path / "MNIST" / "raw", write_idx_gz)

    def crash(f: object, arr: np.ndarray) -> None:
        f.write(b"\x93NUMPY half")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(data_cache_mod.np, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("mnist", "test", data_root=tmp_path)
    monkeypatch.undo()
    monkeypatch.setenv("STEALGUARD_CACHE", str(data_cache))
    entry = next(data_cache.iterdir())
    assert list(entry.iterdir()) == []  # the temp file was removed, no meta written
    ds = load_dataset("mnist", "test", data_root=tmp_path)
    assert len(ds) == 12


def test_unwritable_cache_warns_and_still_loads(
    tmp_path: Path, write_idx_gz: WriteIdx, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_mnist(tmp_path / "MNIST" / "raw", write_idx_gz)
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    monkeypatch.setenv("STEALGUARD_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="STEALGUARD_CACHE"):
        ds = load_dataset("mnist", "test", data_root=tmp_path)
    assert len(ds) == 12


def test_clear_cache(tmp_path: Path, write_idx_gz: WriteIdx, data_cache: Path) -> None:
    _fake_mnist(tmp_path / "MNIST" / "raw", write_idx_gz)
    load_dataset("mnist", "test", data_root=tmp_path)
    assert data_cache_mod.clear_cache("cifar10") == 0
    assert data_cache_mod.clear_cache("mnist") == 1 and not list(data_cache.iterdir())
