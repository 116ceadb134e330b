"""From a DataConfig to ready datasets and DataLoaders.

`build_datasets` opens the dataset (or only its training split, part of which it holds out
as the validation set with data.val_split), computes (or reads the cached) training-set
statistics the preprocessing needs, and attaches the paper's training transform to the
training set and the centre-crop test transform to the validation set. `build_loader` wraps
a dataset in a DataLoader whose shuffling depends only on `seed` and the epoch
(`loader.sampler.set_epoch`), so a resumed run sees the same order as an uninterrupted one;
a stream (a shard folder's ShardImages) orders itself the same way (`dataset.set_epoch`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from torch.utils.data.dataloader import default_collate

from canon.data.config import MAX_IMAGE_PIXELS, DataConfig
from canon.data.datasets import Images, canon_cache_dir, open_dataset, open_train_split
from canon.data.holdout import hold_out
from canon.data.labeled import LabeledImages
from canon.data.preprocess import EvalPreprocess, center_transform, eval_preprocess
from canon.data.sampling import ShuffleSampler
from canon.data.shard_index import read_index
from canon.data.shards import ShardImages
from canon.data.stats import DatasetStats, load_or_compute_stats, mean_image_fit, needs_stats
from canon.data.transforms import training_transform
from canon.errors import ConfigError


def dataset_stats(
    config: DataConfig, train: Images, *, root_cache: Path | None = None,
    workers: int = 0, progress: bool = True, strict: bool = False,
) -> DatasetStats | None:
    """The training set's statistics when the configured preprocessing needs them (`strict`:
    load_or_compute_stats's)."""
    if not needs_stats(config):
        return None
    return _cached_stats(config, train, root_cache, workers=workers, progress=progress,
                         strict=strict)[0]


def recipe_statistics(
    config: DataConfig, *, cache: Path | None = None, workers: int = 0, strict: bool = False,
    refresh: bool = False,
) -> tuple[DatasetStats, Path]:
    """`canon stats --recipe`: the statistics a run with data section `config` reads (its
    size, its mean image's fit, the images it trains on), computed now or read from the
    cache, and their file."""
    if not needs_stats(config):
        raise ConfigError(f"data.mean={config.mean!r} subtracts published constants (or "
                          "data.normalization_from a trained model's), and no "
                          "data.pca_source=dataset: runs of this recipe read no statistics")
    cache = cache or canon_cache_dir()
    train = training_images(config, config.dataset, cache=cache, strict=strict,
                            download=config.download, max_pixels=config.max_image_pixels)
    return _cached_stats(config, train, cache, workers=workers, strict=strict, refresh=refresh)


def _cached_stats(config: DataConfig, train: Images, cache: Path | None,
                  **options: Any) -> tuple[DatasetStats, Path]:
    """load_or_compute_stats at the size and fit a run with data section `config` reads them
    (one key for training and `canon stats --recipe`, so that the one finds the other's)."""
    return load_or_compute_stats(train, config.resize_size, fit=mean_image_fit(config),
                                 cache=cache, **options)


@dataclass(frozen=True)
class Datasets:
    """A training and a validation set, and the test-time preprocessing the validation set's
    images get (evaluation protocols make their views with it; a trained model keeps its
    mean and std). `preprocess` is None for sets of ready tensors."""

    train: Dataset
    val: Dataset
    preprocess: EvalPreprocess | None = None


def build_datasets(
    config: DataConfig,
    *,
    root_cache: str | Path | None = None,
    strict: bool = False,
    workers: int = 0,
) -> Datasets:
    """Train and validation sets with the paper's training and centre-crop test transforms.

    Items are (float tensor 3 x crop_size x crop_size, int label); both have `.classes`.
    A shard folder's sets are ShardImages streams, which the trainer deals out to its ranks.
    The validation set is the dataset's test/val split or, with data.val_split, that many
    training images held out (canon.data.holdout; the other split is then not read, and the
    statistics are of the rest; not for a shard folder, whose val shards are its validation
    set). `root_cache` (default $CANON_CACHE or ~/.cache/canon) holds downloads and
    statistics; `workers` decoding processes compute the statistics of an image folder or
    shard folder when they are not cached yet (pass the run's train.workers).
    """
    cache = Path(root_cache) if root_cache else canon_cache_dir()
    options = reading_options(config, cache, strict)
    if config.val_split:
        train, val = _held_out(open_train_split(config.dataset, **options), config)
    else:
        train, val = open_dataset(config.dataset, **options)
    stats = dataset_stats(config, train, root_cache=cache, workers=workers, strict=strict)
    preprocess = eval_preprocess(config, stats)
    return Datasets(
        train.with_transform(training_transform(config, stats)),
        val.with_transform(center_transform(preprocess)),
        preprocess,
    )


def build_training_set(config: DataConfig, *, root_cache: Path | None = None) -> Images:
    """build_datasets' training set for a data section without a held-out split, its
    training split alone read (a folder without val/ will do): what a pipeline benchmark
    times."""
    cache = root_cache or canon_cache_dir()
    train = open_train_split(config.dataset, **reading_options(config, cache, False))
    stats = dataset_stats(config, train, root_cache=cache)
    return train.with_transform(training_transform(config, stats))


def reading_options(config: DataConfig | None, cache: Path, strict: bool) -> dict[str, Any]:
    """How a split is opened (open_dataset and its kin), by a data section where there is one:
    else nothing downloaded, the default pixel limit."""
    return {"cache": cache, "strict": strict,
            "download": config.download if config else False,
            "max_pixels": config.max_image_pixels if config else MAX_IMAGE_PIXELS}


def trained_preprocess(
    config: DataConfig, dataset: str, *, cache: Path, strict: bool, download: bool,
    max_pixels: int,
) -> EvalPreprocess:
    """The test-time preprocessing build_datasets gives a run with data section `config` on
    `dataset`: normalised by the statistics of the images it trains on (the training split,
    less data.val_split), read only when the preprocessing needs them (not for published
    constants or data.normalization_from)."""
    if not needs_stats(config):
        return eval_preprocess(config)
    train = training_images(config, dataset, cache=cache, strict=strict, download=download,
                            max_pixels=max_pixels)
    return eval_preprocess(config, dataset_stats(config, train, root_cache=cache,
                                                 strict=strict))


def training_images(
    config: DataConfig, dataset: str, *, cache: Path, strict: bool, download: bool,
    max_pixels: int,
) -> Images:
    """The images a run with data section `config` trains on in `dataset`: its training split,
    less the data.val_split images held out."""
    train = open_train_split(dataset, cache=cache, strict=strict, download=download,
                             max_pixels=max_pixels)
    return _held_out(train, config)[0] if config.val_split else train


def _held_out(train: Images, config: DataConfig) -> tuple[LabeledImages, LabeledImages]:
    """(the images trained on, the validation set) of a training split, data.val_split."""
    if isinstance(train, ShardImages):  # it streams whole shards, takes no image by index
        raise ConfigError(
            f"data.val_split {config.val_split}: a shard folder (canon pack) cannot hold "
            f"images out of its training split; it validates on its val shards (set "
            f"data.val_split=0), or train from the folder it was packed from, "
            f"{read_index(train.root).source}"
        )
    return hold_out(train, config.val_split, config.val_split_seed)


def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    """default_collate, minus the items of undecodable files (None). A batch in which every
    file was bad comes out with 0 items: images of shape (0,), labels of shape (0,)."""
    good = [item for item in items if item is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return default_collate(good)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    workers: int = 0,
    sampler: Sampler | None = None,
    seed: int = 0,
    drop_last: bool | None = None,
    collate_fn: Callable[[list], object] = collate,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader: shuffled (ShuffleSampler from `seed`) when training, in order otherwise
    (a stream, an IterableDataset, orders itself); `sampler` (e.g. a DistributedSampler)
    replaces either. Worker random streams (the augmentation) also derive from `seed`, one
    per worker, so the augmentation depends on the number of workers; with workers=0 it draws
    from torch's global generator (seed it with torch.manual_seed). For augmentation that any
    worker count repeats, wrap the set in canon.data.sampling.SeededSamples, as canon's
    trainer does. drop_last defaults to `train`.
    `collate_fn` is views.collate_views for multi-view test protocols. Batches are pinned
    for faster copies when CUDA is present, unless `pin_memory` says otherwise. A shard
    folder's stream deals whole batches to the loader's workers: one made for another batch
    size or worker count is read as a copy made for the loader's (loader.dataset; its own seed
    orders it)."""
    if sampler is None and train and not isinstance(dataset, IterableDataset):
        sampler = ShuffleSampler(dataset, seed)
    if isinstance(dataset, ShardImages) and (dataset.batch_size, dataset.workers) != (
        batch_size, workers
    ):
        dataset = dataset.reading(batch_size=batch_size, workers=workers)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        drop_last=train if drop_last is None else drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers > 0,
        generator=generator,
    )
