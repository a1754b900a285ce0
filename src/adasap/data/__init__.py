"""Datasets: built-in loaders, image sets and batching."""

from adasap.data.datasets import (
    DATASETS,
    DataBundle,
    DatasetSpec,
    FolderImageSet,
    TensorImageSet,
    batches,
    get_spec,
    load_dataset,
)

__all__ = [
    "DATASETS",
    "DataBundle",
    "DatasetSpec",
    "FolderImageSet",
    "TensorImageSet",
    "batches",
    "get_spec",
    "load_dataset",
]
