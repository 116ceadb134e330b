"""Datasets, the papers' preprocessing, statistics, loaders and test-time views.

    from canon.data import DataConfig, build_datasets, build_loader
    sets = build_datasets(DataConfig())          # the bundled CIFAR-10 sample
    loader = build_loader(sets.train, 128, train=True, seed=0)

Names are imported on first use (canon.lazy), so that reading a recipe's data section
(DataConfig) does not import torch and torchvision.
"""

from canon.lazy import lazy_attributes

_HOMES = {
    "DataConfig": "canon.data.config",
    "ArrayImages": "canon.data.datasets",
    "BadImageWarning": "canon.data.datasets",
    "FolderImages": "canon.data.datasets",
    "LabeledImages": "canon.data.datasets",
    "decode_image_file": "canon.data.datasets",
    "open_dataset": "canon.data.datasets",
    "open_eval_split": "canon.data.datasets",
    "Datasets": "canon.data.loaders",
    "ShuffleSampler": "canon.data.loaders",
    "build_datasets": "canon.data.loaders",
    "build_loader": "canon.data.loaders",
    "collate": "canon.data.loaders",
    "DatasetStats": "canon.data.stats",
    "compute_stats": "canon.data.stats",
    "load_or_compute_stats": "canon.data.stats",
    "EvalPreprocess": "canon.data.transforms",
    "eval_preprocess": "canon.data.transforms",
    "training_transform": "canon.data.transforms",
}
__all__ = sorted(_HOMES)
__getattr__ = lazy_attributes(__name__, _HOMES)
