"""The data side of the papers: datasets, their preprocessing and training augmentation,
training-set statistics, loaders and test-time views, e.g.

    from canon.data import DataConfig, build_datasets, build_loader
    sets = build_datasets(DataConfig())          # the bundled CIFAR-10 sample
    loader = build_loader(sets.train, 128, train=True, seed=0)
"""

from canon.lazy import lazy_attributes

# Names are imported from their home module on first use (canon.lazy), so that reading a
# recipe's data section (DataConfig) does not import torch and torchvision.
_HOMES = {
    "DataConfig": "canon.data.config",
    "open_dataset": "canon.data.datasets",
    "open_eval_split": "canon.data.datasets",
    "open_split": "canon.data.datasets",
    "open_train_split": "canon.data.datasets",
    "decode_image_file": "canon.data.decoding",
    "BadImageWarning": "canon.data.folders",
    "UndecodableImageWarning": "canon.data.folders",
    "FolderImages": "canon.data.folders",
    "ArrayImages": "canon.data.labeled",
    "ImageSubset": "canon.data.labeled",
    "LabeledImages": "canon.data.labeled",
    "Datasets": "canon.data.loaders",
    "ShuffleSampler": "canon.data.sampling",
    "build_datasets": "canon.data.loaders",
    "build_loader": "canon.data.loaders",
    "collate": "canon.data.loaders",
    "EvalPreprocess": "canon.data.preprocess",
    "eval_preprocess": "canon.data.preprocess",
    "DatasetStats": "canon.data.stats",
    "compute_stats": "canon.data.stats",
    "load_or_compute_stats": "canon.data.stats",
    "training_transform": "canon.data.transforms",
}
__all__ = sorted(_HOMES)
__getattr__ = lazy_attributes(__name__, _HOMES)
