"""Data: built-in datasets, adasap's image sets, batching, and batch sources for any data."""

from adasap.data.batching import augment_batch, batches, num_batches
from adasap.data.datasets import DATASETS, get_spec, load_dataset, register_dataset
from adasap.data.folders import FolderImageSet, ImageFolderFiles
from adasap.data.image_sets import DataBundle, ImageSet, TensorImageSet
from adasap.data.specs import DatasetSpec

__all__ = [
    "DATASETS",
    "DataBundle",
    "DatasetSpec",
    "FolderImageSet",
    "ImageFolderFiles",
    "ImageSet",
    "TensorImageSet",
    "augment_batch",
    "batches",
    "get_spec",
    "load_dataset",
    "num_batches",
    "register_dataset",
]
