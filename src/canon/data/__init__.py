"""Datasets, the papers' preprocessing, statistics, loaders and test-time views.

    from canon.data import DataConfig, build_datasets, build_loader
    train, val = build_datasets(DataConfig())          # the bundled CIFAR-10 sample
    loader = build_loader(train, 128, train=True, seed=0)
"""

from canon.data.config import DataConfig
from canon.data.datasets import (
    ArrayImages,
    BadImageWarning,
    FolderImages,
    LabeledImages,
    decode_image_file,
    open_dataset,
)
from canon.data.loaders import ShuffleSampler, build_datasets, build_loader, collate
from canon.data.stats import DatasetStats, compute_stats, load_or_compute_stats
from canon.data.transforms import EvalPreprocess, eval_preprocess, training_transform

__all__ = [
    "ArrayImages",
    "BadImageWarning",
    "DataConfig",
    "DatasetStats",
    "EvalPreprocess",
    "FolderImages",
    "LabeledImages",
    "ShuffleSampler",
    "build_datasets",
    "build_loader",
    "collate",
    "compute_stats",
    "decode_image_file",
    "eval_preprocess",
    "load_or_compute_stats",
    "open_dataset",
    "training_transform",
]
