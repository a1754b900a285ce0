"""Data: built-in datasets, adasap's image sets, batching, batch sources for any data, and
detection sets (boxes) with their batches."""

from adasap.data.batching import augment_batch, batches, num_batches
from adasap.data.datasets import (
    DATASETS,
    dataset_options,
    get_spec,
    load_dataset,
    register_dataset,
)
from adasap.data.detection import (
    DetectionBatches,
    DetectionBundle,
    DetectionSet,
    DetectionSpec,
    FileDetectionSet,
    detection_collate,
)
from adasap.data.detection_canvas import load_canvas_detection
from adasap.data.detection_files import load_coco, load_coco_detection, load_voc, load_voc_detection
from adasap.data.folders import FolderImageSet, ImageFolderFiles, default_workers
from adasap.data.image_sets import DataBundle, ImageSet, TensorImageSet
from adasap.data.sources import BatchSource, evaluation_source, training_source
from adasap.data.specs import DatasetSpec

__all__ = [
    "BatchSource",
    "DATASETS",
    "DataBundle",
    "DatasetSpec",
    "DetectionBatches",
    "DetectionBundle",
    "DetectionSet",
    "DetectionSpec",
    "FileDetectionSet",
    "FolderImageSet",
    "ImageFolderFiles",
    "ImageSet",
    "TensorImageSet",
    "augment_batch",
    "batches",
    "dataset_options",
    "default_workers",
    "detection_collate",
    "evaluation_source",
    "get_spec",
    "load_canvas_detection",
    "load_coco",
    "load_coco_detection",
    "load_dataset",
    "load_voc",
    "load_voc_detection",
    "num_batches",
    "register_dataset",
    "training_source",
]
