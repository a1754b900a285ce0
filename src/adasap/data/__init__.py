"""Data: built-in datasets, adasap's image sets, batching, and batch sources for any data."""

from adasap.data.batching import augment_batch, batches, num_batches
from adasap.data.datasets import (
    DATASETS,
    dataset_options,
    get_spec,
    load_dataset,
    register_dataset,
)
from adasap.data.folders import FolderImageSet, ImageFolderFiles, default_workers
from adasap.data.image_sets import DataBundle, ImageSet, TensorImageSet
from adasap.data.sources import BatchSource, evaluation_source, training_source
from adasap.data.specs import DatasetSpec

__all__ = [
    "BatchSource",
    "DATASETS",
    "DataBundle",
    "DatasetSpec",
    "FolderImageSet",
    "ImageFolderFiles",
    "ImageSet",
    "TensorImageSet",
    "augment_batch",
    "batches",
    "dataset_options",
    "default_workers",
    "evaluation_source",
    "get_spec",
    "load_dataset",
    "num_batches",
    "register_dataset",
    "training_source",
]
