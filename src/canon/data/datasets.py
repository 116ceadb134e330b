"""A dataset by name or folder: the bundled CIFAR-10 sample, CIFAR-10/100 (He et al. s4.2),
image folder trees such as ImageNet (Krizhevsky et al. s2) and shard folders of them (`canon
pack`, streamed by canon.data.shards.ShardImages) opened as untransformed train and validation
sets (`open_dataset`) or as an evaluation split alone (`open_eval_split`), the cache folder for
downloads and statistics, and the fingerprints that key cached statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from canon.data.cifar import CIFAR, fetch_cifar, find_cifar, read_cifar
from canon.data.config import MAX_IMAGE_PIXELS, DataConfig
from canon.data.decoding import decode_image_file
from canon.data.folders import (
    BadImageWarning,
    FolderImages,
    check_known_classes,
    open_eval_folder,
    open_image_folder,
    open_train_folder,
    short_list,
    split_folder,
)
from canon.data.labeled import ArrayImages, ImageSubset, LabeledImages
from canon.data.shard_index import is_shard_folder, read_index
from canon.data.shards import ShardImages
from canon.errors import ConfigError, DataError

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"

Images = LabeledImages | ShardImages  # a split as the openers give it

IMAGENET = "imagenet"  # the ImageNet recipes' dataset until --data names the folder
# Recipes' dataset names that only a folder of the user's can stand for (--data), with where
# to get it.
PLACEHOLDERS = {
    IMAGENET: "the images are ImageNet's (which canon cannot download)",
    "imagenette2-160": "the images are Imagenette-160's (fast.ai's 10-class subset of "
    "ImageNet): download https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz, "
    "unpack it",
}


def canon_cache_dir() -> Path:
    """Where canon keeps downloads and statistics: $CANON_CACHE, else ~/.cache/canon."""
    return Path(os.environ.get("CANON_CACHE", Path.home() / ".cache" / "canon"))


# ---------------------------------------------------------------------------------------------
# The bundled sample


@lru_cache(maxsize=2)
def _sample_arrays(split: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    mosaic = decode_image_file(SAMPLE_DIR / f"{split}.webp")
    tile = 32
    rows, cols = mosaic.shape[1] // tile, mosaic.shape[2] // tile
    labels = tuple(int(x) for x in np.load(SAMPLE_DIR / f"{split}.labels.npy"))
    images = mosaic.reshape(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4)
    images = images.reshape(rows * cols, 3, tile, tile)[: len(labels)].contiguous()
    return images, labels


def load_sample(split: str) -> ArrayImages:
    """The bundled CIFAR-10 sample (see sample/PROVENANCE.md), decoded once per process."""
    classes = (SAMPLE_DIR / "classes.txt").read_text().splitlines()
    images, labels = _sample_arrays(split)
    return ArrayImages(images, list(labels), classes, name=f"sample-{split}")


# ---------------------------------------------------------------------------------------------
# Name or folder -> raw train/val datasets


def open_dataset(
    dataset: str,
    *,
    cache: Path | None = None,
    strict: bool = False,
    download: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[Images, Images]:
    """Untransformed (train, validation) datasets for a DataConfig.dataset value (a shard
    folder's as ShardImages: train shuffled, val in pack order)."""
    source = _source(dataset, cache or canon_cache_dir(), download, strict, max_pixels)
    if isinstance(source, Path):
        return open_image_folder(source, strict=strict, max_pixels=max_pixels)
    train, val = source("train"), source("test")
    for split in (train, val):  # here, not when a split is opened alone: statistics read
        if isinstance(split, ShardImages):  # the train split's index, evaluation val's shards
            split.check_files()
    return train, val


def open_train_split(
    dataset: str,
    *,
    cache: Path | None = None,
    strict: bool = False,
    download: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Images:
    """The training split alone of a DataConfig.dataset value (no other split is read)."""
    source = _source(dataset, cache or canon_cache_dir(), download, strict, max_pixels)
    if isinstance(source, Path):
        return open_train_folder(source, strict=strict, max_pixels=max_pixels)
    return source("train")


def open_eval_split(
    dataset: str,
    class_ids: list[str] | None = None,
    *,
    cache: Path | None = None,
    strict: bool = False,
    download: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Images:
    """The evaluation split alone of a DataConfig.dataset value (no training split is read).

    A folder's is its val/, validation/, valid/ or test/ subfolder (in that preference), or
    the folder itself when it has no train/ either (it holds the class folders); a shard
    folder's its val shards; CIFAR's and the sample's the test split. With `class_ids` (a
    trained model's, in its output order) labels index them, matched by name (folder name,
    e.g. wnid; CIFAR class name): the split may hold some of the model's classes but no
    others. Without, its own classes, sorted.
    """
    source = _source(dataset, cache or canon_cache_dir(), download, strict, max_pixels)
    if isinstance(source, Path):
        return open_eval_folder(source, class_ids, strict=strict, max_pixels=max_pixels)
    split = source("test")
    if isinstance(split, ShardImages):  # before the pass, not at the shard that is missing
        split.check_files()
    return split if class_ids is None else _relabel(split, class_ids)


def open_split(dataset: str, split: str, **options: Any) -> LabeledImages:
    """The training ("train") or evaluation ("val") split alone of a DataConfig.dataset value,
    labelled by its own classes; `options` are open_train_split's / open_eval_split's. Its
    readers take images by index: a shard folder, which streams, is refused."""
    root = Path(dataset).expanduser()
    if is_shard_folder(root):
        raise ConfigError(
            f"{dataset}: a shard folder (canon pack), which training and evaluation stream; "
            f"this command reads images by index: pass the folder it was packed from, "
            f"{read_index(root).source}"
        )
    if split == "train":
        return open_train_split(dataset, **options)
    if split == "val":
        return open_eval_split(dataset, **options)
    raise ConfigError(f"split must be 'train' or 'val', got {split!r}")


def check_dataset_name(dataset: str) -> None:
    """Before any work: a placeholder dataset name (PLACEHOLDERS) needs --data."""
    if dataset in PLACEHOLDERS and not Path(dataset).is_dir():
        raise DataError(
            f"{PLACEHOLDERS[dataset]}: pass --data /path/to/{dataset} (the recipe's "
            "data.dataset), a folder holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"
        )


def check_recorded_dataset(dataset: str, verb: str) -> None:
    """Before a run resumes (`verb` "resume") or is evaluated ("evaluate") on the dataset it
    records: a folder no longer there (moved, renamed, or another machine's) is named with the
    way on, --data."""
    if dataset in PLACEHOLDERS:  # no folder recorded (torchvision's weights: "imagenet")
        check_dataset_name(dataset)
    elif not is_dataset_name(dataset) and not Path(dataset).expanduser().exists():
        raise DataError(f"the run trained on {dataset}, which is not there any more: if its "
                        f"images moved, {verb} with --data NEWPATH (the same images, or the "
                        "same shards)")


def anchored_dataset(dataset: str) -> str:
    """`dataset` as a run records it: an existing folder as its absolute path, so that eval
    and resume read the same folder from any working directory; a name (sample, cifar10,
    cifar100) or a missing path as it is."""
    if is_dataset_name(dataset):
        return dataset
    root = Path(dataset).expanduser()
    return str(root.resolve()) if root.exists() else dataset


def is_dataset_name(dataset: str) -> bool:
    """A dataset canon knows by name (the bundled sample, CIFAR), not a folder."""
    return dataset == "sample" or dataset in CIFAR


def recorded_differences(
    path: Path, subject: dict[str, str], *, plain: tuple[str, ...] = ()
) -> dict[str, str]:
    """What the JSON result at `path` records of `subject`'s keys other than `subject` says,
    as {key: recorded}; nothing where there is no such result. A dataset or image (any key
    but `plain`) is compared only where recorded as anchored_dataset gives it (a name or an
    absolute path): an earlier canon recorded folders as typed, relative to a working
    directory no longer known."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(earlier, dict):
        return {}
    recorded = {key: str(earlier[key]) for key in subject if key in earlier}
    return {key: value for key, value in recorded.items() if value != subject[key] and (
        key in plain or is_dataset_name(value) or Path(value).is_absolute())}


def validates_on_test_split(data: DataConfig) -> bool:
    """True when the validation images are the dataset's test split: CIFAR and the bundled
    sample have no validation split, so without data.val_split canon validates on their test
    images, as on an image folder's test/ where it has no val/ (nor validation/, valid/), and
    on a pack's val split packed from such a test/. An image folder's val/ is a validation set
    (ImageNet's, which the papers report on, its test labels being unpublished)."""
    if data.val_split:
        return False
    name = data.dataset
    folder = Path(name).expanduser()
    if is_dataset_name(name) or find_cifar(folder) is not None:
        return True
    if is_shard_folder(folder):
        return _packed_from(folder, "val") == "test"
    evaluated = split_folder(folder, "val")
    return evaluated is not None and evaluated.name == "test"


def _packed_from(pack: Path, split: str) -> str | None:
    """The name of the folder a pack's `split` was packed from: as its index records it, else
    (a pack made before canon recorded it) as its source folder holds it now, if it is there."""
    index = read_index(pack)
    packed = index.splits.get(split)
    if packed is not None and packed.folder is not None:
        return packed.folder
    source = Path(index.source)
    found = split_folder(source, split) if packed is not None and source.is_dir() else None
    return None if found is None else found.name


def _source(
    dataset: str, cache: Path, download: bool, strict: bool = False,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Callable[[str], ArrayImages | ShardImages] | Path:
    """A DataConfig.dataset value as a reader of its "train" and "test" splits (the sample,
    CIFAR, a shard folder) or as the root of an image folder tree."""
    check_dataset_name(dataset)
    if dataset == "sample":
        return load_sample
    if dataset in CIFAR:
        if find_cifar(Path(dataset)) is not None:  # a name means canon's own copy
            warnings.warn(f"data.dataset {dataset} names canon's copy in {cache / 'datasets'}; "
                          f"the folder {Path(dataset).resolve()} holds one too: give it as "
                          f"./{dataset} to read that one", stacklevel=3)
        folder = fetch_cifar(dataset, cache / "datasets", download=download)
        return partial(read_cifar, dataset, folder)
    root = Path(dataset).expanduser()
    if not root.is_dir():
        raise DataError(
            f"dataset {dataset!r} is neither sample, cifar10, cifar100 nor an existing folder; "
            f"a folder must hold the ImageNet layout {root}/train/<class>/*.JPEG and "
            f"{root}/val/<class>/*.JPEG, or cifar-10-batches-py/ or cifar-100-python/, or be "
            "a shard folder (canon pack)"
        )
    if is_shard_folder(root):
        return partial(_shard_split, root, strict=strict, max_pixels=max_pixels)
    found = find_cifar(root)
    return root if found is None else partial(read_cifar, *found)


def _shard_split(root: Path, split: str, *, strict: bool, max_pixels: int) -> ShardImages:
    """A shard folder's "train" split, shuffled, or its val split ("test"), in pack order;
    classes it holds no image of are warned of, as a folder's empty class folders are."""
    training = split == "train"
    images = ShardImages(root, "train" if training else "val", shuffle=training, strict=strict,
                         max_pixels=max_pixels)
    if images.empty_classes:
        warnings.warn(f"{root}: {images.split} class(es) {short_list(images.empty_classes)} hold "
                      "no image (none of their files was readable when packed)",
                      BadImageWarning, stacklevel=3)
    return images


def _relabel(split: ArrayImages | ShardImages, class_ids: list[str]) -> ArrayImages | ShardImages:
    """`split` with labels indexing `class_ids` (its classes matched by name)."""
    if split.class_ids == list(class_ids):
        return split
    if isinstance(split, ShardImages):
        return split.reading(class_ids=class_ids)
    check_known_classes(split.name, split.class_ids, class_ids)
    index_of = {name: i for i, name in enumerate(class_ids)}
    labels = [index_of[split.class_ids[label]] for label in split.labels]
    return ArrayImages(split.images, labels, list(class_ids), name=split.name)


def dataset_fingerprint(dataset: Images) -> str:
    """A short key that changes when the dataset's content does (for cached statistics)."""
    if isinstance(dataset, FolderImages | ShardImages):
        # An image over max_pixels is skipped when it is decoded: another limit, other images.
        limit = "" if dataset.max_pixels == MAX_IMAGE_PIXELS else f"-max{dataset.max_pixels}"
        return dataset.fingerprint() + limit
    if isinstance(dataset, ArrayImages):
        digest = hashlib.sha256(np.ascontiguousarray(dataset.images.numpy()))  # no copy
        digest.update(np.asarray(dataset.labels, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]
    if isinstance(dataset, ImageSubset):
        digest = hashlib.sha256(dataset_fingerprint(dataset.parent).encode())
        digest.update(np.asarray(dataset.indices, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]
    raise TypeError(f"cannot fingerprint {type(dataset).__name__}")
