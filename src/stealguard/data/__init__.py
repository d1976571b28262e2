"""Datasets by name: loaders, cache, download with checksums, batched augmentation."""

from stealguard.data import loaders as _loaders  # noqa: F401  (registers)
from stealguard.data.base import DATASETS, ImageDataset
from stealguard.data.loaders import load_dataset, resolve_data_root

__all__ = ["DATASETS", "ImageDataset", "load_dataset", "resolve_data_root"]
