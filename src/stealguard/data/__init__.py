"""Datasets by name: loaders, cache, download with checksums, batched augmentation."""

from stealguard.data import loaders as _loaders  # noqa: F401  (registers)
from stealguard.data.base import DATASETS, ImageDataset
from stealguard.data.loaders import (
    check_disjoint_splits,
    dataset_status,
    load_dataset,
    resolve_data_root,
)

__all__ = ["DATASETS", "ImageDataset", "check_disjoint_splits", "dataset_status", "load_dataset",
           "resolve_data_root"]
