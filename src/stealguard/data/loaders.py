"""Dataset loaders by name: MNIST family, CIFAR-10/100, SVHN, EMNIST letters, image folders.

    ds = load_dataset("cifar10", "test")           # ImageDataset, images uint8 (N, 3, 32, 32)
    ds = load_dataset("imagefolder:~/pics", "train")
    dataset_shape("mnist")                          # (1, 28, 10), without reading any file

Files are looked up under the data root (`resolve_data_root`) in the torchvision layout; each
loader first names the files it would read (`FileLoader.sources`, which also raises the
"missing file" errors) and then decodes them (`FileLoader.read`). `load_dataset` keys the
decoded-array cache (`stealguard.data.cache`) on those source files.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stealguard.data import cache as _cache
from stealguard.data import formats
from stealguard.data.base import DATASETS, ImageDataset, Loader
from stealguard.errors import DatasetNotFoundError, InputError, UnknownNameError

SPLITS = ("train", "test")
IMAGEFOLDER_PREFIX = "imagefolder:"

_CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a registered dataset without reading it."""

    channels: int
    size: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_DIGITS = tuple(str(i) for i in range(10))
DATASET_INFO: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(1, 28, _DIGITS, (0.1307,), (0.3081,)),
    "fashionmnist": DatasetInfo(
        1, 28,
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        (0.2860,), (0.3530,),
    ),
    "kmnist": DatasetInfo(
        1, 28, ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"), (0.1918,), (0.3483,)
    ),
    "emnist-letters": DatasetInfo(
        1, 28, tuple("abcdefghijklmnopqrstuvwxyz"), (0.1307,), (0.3081,)
    ),
    "cifar10": DatasetInfo(
        3, 32,
        ("airplane", "automobile", "bird", "cat", "deer",
         "dog", "frog", "horse", "ship", "truck"),
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": DatasetInfo(
        3, 32, tuple(_CIFAR100_CLASSES), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    ),
    "svhn": DatasetInfo(3, 32, _DIGITS, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}


def dataset_shape(name: str) -> tuple[int, int, int]:
    """(channels, size, num_classes) of a registered dataset, without reading any file."""
    if name.startswith(IMAGEFOLDER_PREFIX):
        raise InputError(f"the shape of {name!r} is known only after loading it")
    info = DATASET_INFO.get(name)
    if info is None:
        raise UnknownNameError("dataset", name, sorted(DATASET_INFO))
    return info.channels, info.size, info.num_classes


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """The data root: the argument, else `$STEALGUARD_DATA`, else <user cache>/datasets."""
    if data_root is not None and str(data_root) != "":
        return Path(data_root).expanduser()
    env = os.environ.get("STEALGUARD_DATA")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("stealguard")) / "datasets"


# ---------------------------------------------------------------------------------------------
# Loaders that name their sources before reading them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sources:
    """The files a loader will read, and which of its readers reads them."""

    kind: str
    files: list[Path]
    classes: tuple[str, ...] = ()  # only where the files alone do not fix the label order


class FileLoader(ABC):
    """A registered loader `(root, split) -> ImageDataset` in two steps: find, then decode."""

    name: str

    @abstractmethod
    def sources(self, root: Path, split: str) -> Sources:
        """The files to read; raises DatasetNotFoundError naming the path and how to fix it."""

    @abstractmethod
    def read(self, src: Sources, split: str) -> ImageDataset:
        """Decode the files named by `sources`."""

    def __call__(self, root: Path, split: str) -> ImageDataset:
        return self.read(self.sources(root, split), split)


def _missing(what: str, paths: list[Path], root: Path, how: str, note: str = "") -> str:
    """The message of a missing-data error: what, the exact paths looked at, how to provide."""
    looked = "\n".join(f"  {p}" for p in paths)
    root_note = "" if root.exists() else f" (the data root {root} does not exist)"
    return (
        f"{what} not found; looked for:\n{looked}\n{note}To provide it: {how}. "
        f"Data root: {root}{root_note}; set STEALGUARD_DATA or pass data_root to use another."
    )


def _first_existing(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _to_dataset(name: str, split: str, images: np.ndarray, labels: np.ndarray,
                origin: Path) -> ImageDataset:
    """Wrap numpy arrays (images uint8 (N, C, H, W)) as an ImageDataset with the registered info."""
    info = DATASET_INFO[name]
    if images.shape[1:] != (info.channels, info.size, info.size):
        raise InputError(
            f"{origin}: {name} images have shape {images.shape[1:]}, expected "
            f"{(info.channels, info.size, info.size)}"
        )
    _check_labels(labels, info.num_classes, origin)
    if not images.flags.writeable:  # np.frombuffer over bytes: torch wants writable memory
        images = images.copy()
    return ImageDataset(
        name, split, torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(labels.astype(np.int64)), list(info.classes), info.mean, info.std,
    )


def _check_labels(labels: np.ndarray, num_classes: int, origin: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(
            f"{origin}: labels range over [{labels.min()}, {labels.max()}], expected "
            f"[0, {num_classes - 1}]"
        )


# ---- IDX: MNIST, Fashion-MNIST, KMNIST, EMNIST letters --------------------------------------


@dataclass(frozen=True)
class IdxLoader(FileLoader):
    """IDX image + label files under `<root>/<folder>/raw/` (gzipped or not)."""

    name: str
    folder: str
    stems: dict[str, tuple[str, str]]  # split -> (images stem, labels stem)
    transpose: bool = False  # EMNIST stores images transposed relative to MNIST
    label_offset: int = 0  # EMNIST letters are 1..26
    notes: dict[str, str] = field(default_factory=dict)  # split -> extra text for missing files

    def sources(self, root: Path, split: str) -> Sources:
        raw = root / self.folder / "raw"
        files = []
        for stem in self.stems[split]:
            candidates = [raw / f"{stem}.gz", raw / stem]
            found = _first_existing(candidates)
            if found is None:
                how = (f"run `stealguard data download {self.name}` (needs internet), or put "
                       f"the official {stem}.gz at the first path above")
                what = f"{self.name} {split} split: {stem}(.gz)"
                raise DatasetNotFoundError(
                    _missing(what, candidates, root, how, self.notes.get(split, ""))
                )
            files.append(found)
        return Sources("idx", files)

    def read(self, src: Sources, split: str) -> ImageDataset:
        images_path, labels_path = src.files
        images = formats.read_idx(images_path, ndim=3)  # (N, H, W)
        labels = formats.read_idx(labels_path, ndim=1).astype(np.int64) - self.label_offset
        if images.shape[0] != labels.shape[0]:
            raise InputError(
                f"{images_path} has {images.shape[0]} images but {labels_path} has "
                f"{labels.shape[0]} labels"
            )
        if self.transpose:
            images = images.transpose(0, 2, 1)
        return _to_dataset(self.name, split, images[:, None], labels, images_path)


_MNIST_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_KMNIST_NOTE = {
    "train": "The KMNIST train images are missing: this copy of KMNIST has only the test split "
             "(plus the train labels), so the train split cannot be loaded.\n",
}

DATASETS.register("mnist")(IdxLoader("mnist", "MNIST", _MNIST_STEMS))
DATASETS.register("fashionmnist")(IdxLoader("fashionmnist", "FashionMNIST", _MNIST_STEMS))
DATASETS.register("kmnist")(IdxLoader("kmnist", "KMNIST", _MNIST_STEMS, notes=_KMNIST_NOTE))
DATASETS.register("emnist-letters")(IdxLoader(
    "emnist-letters", "EMNIST",
    {s: (f"emnist-letters-{s}-images-idx3-ubyte", f"emnist-letters-{s}-labels-idx1-ubyte")
     for s in SPLITS},
    transpose=True, label_offset=1,
))


# ---- CIFAR-10 / CIFAR-100: JPEG tree, JPEG tar, or the original python pickles ---------------


@dataclass(frozen=True)
class CifarLoader(FileLoader):
    """CIFAR in three formats, tried in order: extracted JPEG tree, JPEG tar, python pickles."""

    name: str
    jpg_dir: str  # <root>/<jpg_dir>/{train,test}/<class>/*.jpg or <root>/<jpg_dir>/<tar_name>
    tar_name: str
    py_dir: str  # <root>/<py_dir>/<batch files>
    py_files: dict[str, tuple[str, ...]]
    label_key: str

    def sources(self, root: Path, split: str) -> Sources:
        tree = root / self.jpg_dir / split
        if tree.is_dir():
            files, _, _ = formats.scan_image_folder(tree)
            if files:
                return Sources("tree", files)
        tar = root / self.jpg_dir / self.tar_name
        if tar.is_file():
            return Sources("tar", [tar])
        py = root / self.py_dir
        if py.is_dir():
            return Sources("pickle", [self._py_file(py, f, root) for f in self.py_files[split]])
        how = (f"run `stealguard data download {self.name}` (needs internet; fetches the "
               f"python format), or put {self.tar_name} (members {split}/<class>/*.jpg) at "
               f"the second path above")
        raise DatasetNotFoundError(
            _missing(f"{self.name} {split} split", [tree, tar, py], root, how)
        )

    def _py_file(self, py: Path, fname: str, root: Path) -> Path:
        path = py / fname
        if not path.is_file():
            how = f"run `stealguard data download {self.name}` to fetch the complete archive"
            raise DatasetNotFoundError(_missing(f"{self.name} file {fname}", [path], root, how))
        return path

    def read(self, src: Sources, split: str) -> ImageDataset:
        readers = {"tree": self._read_tree, "tar": self._read_tar, "pickle": self._read_pickle}
        images, labels = readers[src.kind](src.files, split)
        return _to_dataset(self.name, split, images, labels, src.files[0])

    def _read_tree(self, files: list[Path], split: str) -> tuple[np.ndarray, np.ndarray]:
        class_of = [f.parent.name for f in files]
        labels = self._labels_for(class_of, files[0].parent.parent)
        blobs = [formats.Blob(str(f), 0, -1, str(f)) for f in files]
        return formats.decode_images(blobs, "RGB"), labels

    def _read_tar(self, files: list[Path], split: str) -> tuple[np.ndarray, np.ndarray]:
        tar = files[0]
        members = []  # (class, name, offset, size) of <...>/<split>/<class>/<file>.jpg
        for name, offset, size in formats.tar_members(tar):
            parts = name.split("/")
            if len(parts) >= 3 and parts[-3] == split and name.lower().endswith(
                formats.IMAGE_SUFFIXES
            ):
                members.append((parts[-2], name, offset, size))
        if not members:
            raise InputError(f"{tar}: no {split}/<class>/<image> members in the archive")
        members.sort()
        labels = self._labels_for([m[0] for m in members], tar)
        blobs = [formats.Blob(str(tar), off, size, f"{tar}::{n}") for _, n, off, size in members]
        return formats.decode_images(blobs, "RGB"), labels

    def _read_pickle(self, files: list[Path], split: str) -> tuple[np.ndarray, np.ndarray]:
        return formats.read_cifar_pickles(files, self.label_key)

    def _labels_for(self, class_names: list[str], origin: Path) -> np.ndarray:
        """Labels from folder names; the folders must be exactly the dataset's classes."""
        expected = DATASET_INFO[self.name].classes
        found = sorted(set(class_names))
        if tuple(found) != expected:
            extra, lacking = set(found) - set(expected), set(expected) - set(found)
            raise InputError(
                f"{origin}: class folders do not match {self.name}'s {len(expected)} classes "
                f"(unexpected: {sorted(extra)[:5]}, missing: {sorted(lacking)[:5]})"
            )
        index = {c: i for i, c in enumerate(expected)}
        return np.fromiter((index[c] for c in class_names), np.int64, len(class_names))


DATASETS.register("cifar10")(CifarLoader(
    "cifar10", "CIFAR10-jpg", "cifar10-jpg.tar", "cifar-10-batches-py",
    {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    "labels",
))
DATASETS.register("cifar100")(CifarLoader(
    "cifar100", "CIFAR100-jpg", "cifar100-jpg.tar", "cifar-100-python",
    {"train": ("train",), "test": ("test",)}, "fine_labels",
))


# ---- SVHN --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SvhnLoader(FileLoader):
    """SVHN cropped digits, `<root>/SVHN/{train,test}_32x32.mat`."""

    name: str = "svhn"

    def sources(self, root: Path, split: str) -> Sources:
        path = root / "SVHN" / f"{split}_32x32.mat"
        if not path.is_file():
            how = (f"run `stealguard data download svhn` (needs internet), or put the official "
                   f"{path.name} at that path")
            raise DatasetNotFoundError(_missing(f"svhn {split} split", [path], root, how))
        return Sources("mat", [path])

    def read(self, src: Sources, split: str) -> ImageDataset:
        images, labels = formats.read_svhn_mat(src.files[0])
        return _to_dataset(self.name, split, images, labels, src.files[0])


DATASETS.register("svhn")(SvhnLoader())


# ---- imagefolder:<path> (not registered: the name carries the path) --------------------------


@dataclass(frozen=True)
class ImageFolderLoader(FileLoader):
    """`<path>/<split>/<class>/*.png|jpg`, or `<path>/<class>/*` (one set for both splits).

    Classes are the sorted class-folder names, taken across both split folders so that a
    class missing from one split does not shift the labels of the other.
    """

    name: str
    path: Path

    def sources(self, root: Path, split: str) -> Sources:
        if not self.path.is_dir():
            raise DatasetNotFoundError(_missing(
                self.name, [self.path], self.path,
                "point imagefolder:<path> at a folder of <class>/<image> or "
                "<split>/<class>/<image> files",
            ))
        split_dirs = [self.path / s for s in SPLITS if (self.path / s).is_dir()]
        folder = self.path / split if split_dirs else self.path
        if not folder.is_dir():
            raise DatasetNotFoundError(_missing(
                f"{self.name} {split} split", [folder], self.path,
                f"add a {split}/<class>/<image> folder next to the other split",
            ))
        classes = sorted({c for d in split_dirs or [folder] for c in _class_dirs(d)})
        files, _, _ = formats.scan_image_folder(folder)
        if not files:
            raise DatasetNotFoundError(_missing(
                f"{self.name}: images ({', '.join(formats.IMAGE_SUFFIXES)})",
                [folder / "<class>" / "<image>"], self.path, "add image files in class folders",
            ))
        return Sources("folder", files, tuple(classes))

    def read(self, src: Sources, split: str) -> ImageDataset:
        index = {c: i for i, c in enumerate(src.classes)}
        labels = np.fromiter((index[f.parent.name] for f in src.files), np.int64, len(src.files))
        blobs = [formats.Blob(str(f), 0, -1, str(f)) for f in src.files]
        images = formats.decode_images(blobs, formats.probe_mode(blobs[0]))  # (N, C, H, W)
        c = images.shape[1]
        return ImageDataset(
            self.name, split, torch.from_numpy(images), torch.from_numpy(labels),
            list(src.classes), (0.5,) * c, (0.5,) * c,
        )


def _class_dirs(folder: Path) -> list[str]:
    return [e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def get_loader(name: str) -> Loader:
    """The loader for `name`: a registered name, or `imagefolder:<path>`."""
    if name.startswith(IMAGEFOLDER_PREFIX):
        path = name[len(IMAGEFOLDER_PREFIX):]
        if not path:
            raise InputError("imagefolder needs a path: imagefolder:<path>")
        return ImageFolderLoader(name, Path(path).expanduser())
    for key in (name, name.strip().lower()):
        if key in DATASETS:
            return DATASETS.get(key)
    raise UnknownNameError("dataset", name, DATASETS.names() + ["imagefolder:<path>"])


def load_dataset(
    name: str, split: str = "train", *, data_root: str | Path | None = None, cache: bool = True,
) -> ImageDataset:
    """Load a dataset split as uint8 (N, C, H, W) images and int64 labels.

    name: a registered name (`DATASETS.names()`) or `imagefolder:<path>`; split: "train" or
    "test"; data_root: see `resolve_data_root`; cache: reuse/store decoded arrays (see
    `stealguard.data.cache`; a changed source file is decoded again).
    """
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    loader = get_loader(name)
    root = resolve_data_root(data_root)
    if not isinstance(loader, FileLoader):  # a plain function registered elsewhere
        return loader(root, split)
    src = loader.sources(root, split)
    if not cache:
        return loader.read(src, split)
    extra = f"{src.kind}\n" + "\n".join(src.classes)
    return _cache.load_or_build(
        loader.name, split, src.files, lambda: loader.read(src, split), extra=extra
    )


def known_shape(name: str) -> tuple[int, int, int] | None:
    """(C, H, W) of a registered dataset without reading it; None for imagefolder:<path>."""
    if name.startswith(IMAGEFOLDER_PREFIX):
        return None
    key = name.strip().lower()
    info = DATASET_INFO.get(key if key in DATASET_INFO else name)
    if info is None:
        get_loader(name)  # raises the unknown-name error, listing the valid names
        return None
    return info.channels, info.size, info.size


def check_disjoint_splits(name: str, *, data_root: str | Path | None = None) -> None:
    """Refuse a dataset whose train and test splits are the same files (a flat
    imagefolder:<class>/<image> set): its "test accuracy" would be measured on training data."""
    loader = get_loader(name)
    if not isinstance(loader, FileLoader):
        return
    root = resolve_data_root(data_root)
    train, test = loader.sources(root, "train"), loader.sources(root, "test")
    if set(train.files) & set(test.files):
        raise InputError(
            f"{name}: the train and test splits are the same images (no train/ and test/ "
            f"folders), so a test accuracy would be measured on training data; arrange it as "
            f"<path>/train/<class>/<image> and <path>/test/<class>/<image>")


def dataset_status(root: Path) -> list[dict[str, Any]]:
    """Each registered dataset and whether its train and test splits are present under root."""
    rows: list[dict[str, Any]] = []
    for name in DATASETS.names():
        loader = DATASETS.get(name)
        row: dict[str, object] = {"name": name}
        for split in SPLITS:
            try:
                present = bool(loader.sources(root, split).files) if isinstance(
                    loader, FileLoader) else None
            except (DatasetNotFoundError, InputError):
                present = False
            row[split] = present
        rows.append(row)
    return rows
