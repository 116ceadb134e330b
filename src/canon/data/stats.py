"""Training-set statistics for the papers' preprocessing: the mean image (AlexNet s2, ResNet
s3.4), channel mean and std (VGG s2.1) and the RGB PCA of fancy PCA (AlexNet s4.1), computed in
one streaming pass over the images as the pipeline fits them to a square (mean_image_fit) and
cached, plus ImageNet's published constants for each.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save
from torch.utils.data import DataLoader
from tqdm import tqdm

from canon.data.config import DataConfig
from canon.data.datasets import Images, canon_cache_dir, dataset_fingerprint, open_train_split
from canon.data.geometry import fit_image
from canon.data.labeled import ArrayImages, LabeledImages
from canon.data.shards import ShardImages
from canon.errors import DataError
from canon.files import CACHE_ADVICE, atomic_write

# RGB covariance eigen-decomposition of ImageNet (pixels in [0, 1]), as published with
# fb.resnet.torch (datasets/imagenet.lua) and used by most reimplementations of fancy PCA;
# columns of the matrix are the eigenvectors.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
STATS_VERSION = "1"


@dataclass(frozen=True)
class DatasetStats:
    mean_image: torch.Tensor  # 3 x size x size
    channel_mean: torch.Tensor  # 3
    channel_std: torch.Tensor  # 3
    rgb_covariance: torch.Tensor  # 3 x 3
    pca_eigval: torch.Tensor  # 3, descending
    pca_eigvec: torch.Tensor  # 3 x 3, column i belongs to pca_eigval[i]
    images: int
    skipped: int  # image files left out: undecodable, or empty or missing when listed

    @property
    def size(self) -> int:
        return self.mean_image.shape[-1]

    def summary(self) -> str:
        def fmt(t: torch.Tensor) -> str:
            return "(" + ", ".join(f"{v:.4f}" for v in t.tolist()) + ")"

        return (
            f"images: {self.images} (skipped {self.skipped})\n"
            f"mean image: 3 x {self.size} x {self.size}\n"
            f"channel mean (RGB, 0-1): {fmt(self.channel_mean)}\n"
            f"channel std  (RGB, 0-1): {fmt(self.channel_std)}\n"
            f"PCA eigenvalues: {fmt(self.pca_eigval)}\n"
            f"PCA eigenvectors: {', '.join(fmt(column) for column in self.pca_eigvec.T)}"
        )


def imagenet_pca() -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's published (eigenvalues, eigenvectors as columns)."""
    return torch.tensor(IMAGENET_PCA_EIGVAL), torch.tensor(IMAGENET_PCA_EIGVEC)


def imagenet_channel_stats() -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's published ImageNet channel mean and std (the models' EvalConfig default)."""
    # Imported here: canon.models imports every model family, which data code must not need.
    from canon.models.base import IMAGENET_MEAN, IMAGENET_STD

    return torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)


def mean_image_fit(config: DataConfig) -> str:
    """How the statistics pass fits images to resize_size x resize_size: as the network sees
    them where that is a fixed square, the central squares of AlexNet s2 ("subtracting the
    mean activity over the training set", its training set being those squares) and ZFNet s3;
    else squashed. The papers with whole-image inputs (VGG, GoogLeNet, ResNet) do not say
    how a mean image meets images of many sizes: canon squashes them to one square and
    resamples that mean to each input (canon.data.normalize.Normalize)."""
    return "center-square" if config.image_fit() == "center-square" else "squash"


class _Fitted(torch.utils.data.Dataset):
    """Raw images fitted to size x size (uint8), or None for an undecodable file."""

    def __init__(self, dataset: LabeledImages, size: int, fit: str) -> None:
        self.dataset, self.size, self.fit = dataset, size, fit

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor | None:
        image = self.dataset.load_image(index)
        return None if image is None else fit_image(image, self.size, self.fit, "bilinear")


def _stack_decoded(items: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, int]:
    good = [item for item in items if item is not None]
    return (torch.stack(good) if good else None), len(items) - len(good)


def _stack_items(items: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor | None, int]:
    """_stack_decoded of (image, label) items."""
    return _stack_decoded([None if item is None else item[0] for item in items])


# Images per float64 copy: a 256-image batch of 256 x 256 copied whole took 1.2 GB.
_CHUNK_IMAGES = 16

def compute_stats(
    dataset: Images,
    size: int,
    *,
    fit: str = "squash",
    workers: int = 0,
    batch_size: int = 256,
    progress: bool = True,
) -> DatasetStats:
    """One pass over `dataset` (raw uint8 images), images fitted to size x size ("squash" or
    "center-square", mean_image_fit); pixel values are in [0, 1]. float64 running sums:
    memory is bounded by one mean image, one uint8 batch and the float64 copies of
    _CHUNK_IMAGES of its images."""
    if isinstance(dataset, ArrayImages):  # in memory: slice batches, no per-item overhead
        loader = (
            (fit_image(dataset.images[start : start + batch_size], size, fit, "bilinear"), 0)
            for start in range(0, len(dataset), batch_size)
        )
    elif isinstance(dataset, ShardImages):  # a stream: every image once, in pack order
        dataset = dataset.reading(
            transform=partial(fit_image, size=size, fit=fit, interpolation="bilinear"),
            shuffle=False, rank=0, world_size=1, batch_size=batch_size, workers=workers,
        )
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                            collate_fn=_stack_items)
    else:
        loader = DataLoader(
            _Fitted(dataset, size, fit),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_stack_decoded,
        )
    pixel_sum = torch.zeros(3, size, size, dtype=torch.float64)
    outer_sum = torch.zeros(3, 3, dtype=torch.float64)
    count, skipped = 0, getattr(dataset, "skipped_at_listing", 0)
    # Closed on errors too, so that an error (a bad file under strict) starts its own line.
    with tqdm(total=len(dataset), desc="statistics", unit="img", disable=not progress) as bar:
        for batch, bad in loader:
            skipped += bad
            bar.update(bad)
            if batch is None:
                continue
            for chunk in batch.split(_CHUNK_IMAGES):
                pixels = chunk.to(torch.float64) / 255
                pixel_sum += pixels.sum(0)
                flat = pixels.transpose(0, 1).reshape(3, -1)
                outer_sum += flat @ flat.T
            count += len(batch)
            bar.update(len(batch))
    if count == 0:
        where = getattr(dataset, "root", None)
        raise DataError(f"no decodable images to compute statistics from"
                        f"{'' if where is None else f' in {where}'}: every file failed to "
                        "decode (see the warnings); check the folder")
    mean_image = pixel_sum / count
    channel_mean = mean_image.mean((1, 2))
    covariance = outer_sum / (count * size * size) - torch.outer(channel_mean, channel_mean)
    eigval, eigvec = torch.linalg.eigh(covariance)
    order = eigval.argsort(descending=True)
    eigvec = eigvec[:, order]
    eigvec = eigvec * torch.where(eigvec.sum(0) < 0, -1.0, 1.0)  # deterministic signs
    return DatasetStats(
        mean_image=mean_image.float(),
        channel_mean=channel_mean.float(),
        channel_std=covariance.diagonal().clamp_min(0).sqrt().float(),
        rgb_covariance=covariance.float(),
        pca_eigval=eigval[order].clamp_min(0).float(),
        pca_eigvec=eigvec.float(),
        images=count,
        skipped=skipped,
    )


def needs_stats(config: DataConfig) -> bool:
    """Whether the training set's statistics are needed (else no pass over the data)."""
    uses_pca = config.pca_std > 0 and config.pca_source == "dataset"
    computed_mean = config.mean in ("pixel", "channel") and config.normalization_from is None
    return computed_mean or uses_pca


def stats_cache_path(
    dataset: Images, size: int, cache: Path | None = None, fit: str = "squash"
) -> Path:
    """Keyed by the dataset's fingerprint, the size and, unless squashed, the fit."""
    folder = (cache or canon_cache_dir()) / "stats"
    suffix = "" if fit == "squash" else f"-{fit}"
    return folder / f"{dataset_fingerprint(dataset)}-{size}{suffix}.safetensors"


def load_or_compute_stats(
    dataset: Images,
    size: int,
    *,
    fit: str = "squash",
    cache: Path | None = None,
    workers: int = 0,
    progress: bool = True,
    refresh: bool = False,
    strict: bool = False,
) -> tuple[DatasetStats, Path]:
    """Cached statistics of `dataset` fitted to `size` (compute_stats), computing (and
    caching) them when absent, and their file: a safetensors file (stats_cache_path), so a
    second run reads them in milliseconds. `strict` (a strict dataset's) does not take a cache
    that a lenient call wrote with files skipped: it decodes again, to stop at the first bad
    file."""
    path = stats_cache_path(dataset, size, cache, fit)  # hashes an in-memory set whole: once
    if path.is_file() and not refresh:
        try:
            stats = _load(path)
        except PermissionError:  # another user's, in a shared cache: recomputing would not do
            raise DataError(f"{path}: cannot read these statistics (permission denied); make "
                            f"it readable, or {CACHE_ADVICE}") from None
        except (OSError, ValueError, KeyError, SafetensorError):
            pass  # a stale or partial cache file is recomputed below
        else:
            if not (strict and stats.skipped):
                return stats, path
    if isinstance(dataset, ShardImages):  # before the pass, not at the shard that is missing
        dataset.check_files()
    stats = compute_stats(dataset, size, fit=fit, workers=workers, progress=progress)
    _save(stats, path)
    return stats, path


_TENSORS = ("mean_image", "channel_mean", "channel_std", "rgb_covariance", "pca_eigval",
            "pca_eigvec")


def _save(stats: DatasetStats, path: Path) -> None:
    meta = {"version": STATS_VERSION, "images": str(stats.images), "skipped": str(stats.skipped),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    content = save({k: getattr(stats, k).contiguous() for k in _TENSORS}, metadata=meta)
    # Written by Python: a full disk is an OSError, which atomic_write names (safetensors' own
    # writer raises its own error), and the file gets open()'s mode, not 0600.
    atomic_write(path, lambda temporary: temporary.write_bytes(content), advice=CACHE_ADVICE)


def _load(path: Path) -> DatasetStats:
    from safetensors import safe_open

    with path.open("rb"):  # a denied read is a PermissionError here; safetensors' own, a
        pass               # FileNotFoundError, would pass for a stale cache and be recomputed
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("version") != STATS_VERSION:
            raise ValueError(f"stats version {json.dumps(meta.get('version'))}")
        missing = set(_TENSORS) - set(f.keys())
        if missing:
            raise KeyError(f"stats file lacks {sorted(missing)}")
        tensors = {k: f.get_tensor(k) for k in _TENSORS}
    return DatasetStats(**tensors, images=int(meta["images"]), skipped=int(meta["skipped"]))


def statistics_of(
    dataset: str,
    *,
    size: int | None = None,
    cache: Path | None = None,
    workers: int = 0,
    strict: bool = False,
    refresh: bool = False,
    progress: bool = True,
) -> tuple[DatasetStats, Path]:
    """`canon stats`: the (cached) statistics of a dataset's training split, of its images
    squashed to size x size, and their file. `size` defaults to the images' own side for
    CIFAR and the sample (32) and to 256 (the papers' resize) for folders. A recipe's run
    reads these at its data.resize_size unless it fits its mean image otherwise (AlexNet's and
    ZFNet's central squares) or holds images out: canon.data.loaders.recipe_statistics
    computes what any run reads."""
    train = open_train_split(dataset, cache=cache, strict=strict)
    if size is None:
        size = int(train.images.shape[-1]) if isinstance(train, ArrayImages) else 256
    return load_or_compute_stats(train, size, cache=cache, workers=workers, progress=progress,
                                 refresh=refresh, strict=strict)
