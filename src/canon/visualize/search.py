"""Finding the images a feature responds to most (Zeiler & Fergus 2013, s4.1, Fig. 2: "the top
9 activations in a random subset of feature maps across the validation data"): the image sets
searched, as (centre crops, their indices) batches, and one pass over them that keeps per
channel only its strongest activations."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from canon.data import datasets
from canon.data.labeled import LabeledImages
from canon.data.loaders import build_loader
from canon.data.preprocess import EvalPreprocess, center_transform
from canon.engine.trained import TrainedModel
from canon.errors import ConfigError, DataError

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (images, their indices in the set)


@dataclass(frozen=True)
class TopActivations:
    """Per channel of a layer, its `top` strongest activations over a set of images, strongest
    first: each the maximum of that channel's map in one image."""

    values: torch.Tensor  # C x top
    images: torch.Tensor  # C x top: the images' indices
    positions: torch.Tensor  # C x top: flat positions in the map
    map_size: tuple[int, int]
    searched: int  # images seen

    def strongest_channels(self, count: int) -> list[int]:
        """The `count` channels whose strongest activation is largest (ties: lower index)."""
        order = sorted(range(len(self.values)), key=lambda c: -float(self.values[c, 0]))
        return order[:count]

    def choose(self, channels: Sequence[int], count: int, layer: str) -> list[int]:
        """`channels` when given (ConfigError naming `layer` for one it lacks), else the
        `count` strongest."""
        if not all(0 <= channel < len(self.values) for channel in channels):
            raise ConfigError(f"{layer} has channels 0..{len(self.values) - 1}, not all of "
                              f"{list(channels)}")
        return list(channels) or self.strongest_channels(count)


@torch.no_grad()
def top_activations(
    feature_maps: Callable[[torch.Tensor], torch.Tensor], batches: Batches, top: int
) -> TopActivations:
    """One pass over `batches` keeping, per channel of the N x C x H x W maps that
    `feature_maps` makes of a batch (as loaded: it moves the batch to its model), the `top`
    images whose maximum activation of it is largest: C x top values in memory, never all
    the activations."""
    values = images = positions = None
    searched, map_size = 0, (0, 0)
    for batch, indices in batches:
        if not len(batch):
            continue  # every file of the batch was undecodable
        maps = feature_maps(batch)
        map_size = tuple(maps.shape[-2:])
        peak, where = maps.flatten(2).max(2)  # B x C
        owners = indices.to(peak.device).view(-1, 1).expand_as(peak)
        searched += len(batch)
        if values is not None:
            peak, where = torch.cat([values, peak.T], 1), torch.cat([positions, where.T], 1)
            owners = torch.cat([images, owners.T], 1)
        else:
            peak, where, owners = peak.T, where.T, owners.T
        values, keep = peak.topk(min(top, peak.shape[1]), dim=1)
        images, positions = owners.gather(1, keep), where.gather(1, keep)
    if values is None:
        raise DataError("no image to search: the image set is empty or none could be decoded")
    return TopActivations(values.cpu(), images.cpu(), positions.cpu(), map_size, searched)


class _Indexed(Dataset):
    """Items (image, its index): a loader then says which images a batch holds, even when
    undecodable files were dropped from it."""

    def __init__(self, images: LabeledImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        item = self.images[index]
        return None if item is None else (item[0], index)


def open_split(trained: TrainedModel, data: str | Path | None, split: str) -> LabeledImages:
    """The `split` ("val": the evaluation split, or "train") of `data` (default: the dataset
    the run trained on), untransformed, labelled by its own classes."""
    return datasets.open_split(
        str(data or trained.data.dataset), split, download=trained.data.download,
        max_pixels=trained.data.max_image_pixels,
    )


def image_name(images: LabeledImages, index: int) -> str | int:
    """What a result table calls image `index` of `images`: its file where it has one (an
    image folder's), else its place in the split (CIFAR's, the sample's)."""
    paths = getattr(images, "paths", None)
    return str(paths[index]) if paths is not None else index


def indexed_batches(
    images: LabeledImages, preprocess: EvalPreprocess, batch_size: int, workers: int
) -> DataLoader:
    """(centre crops as the run evaluates them, their indices in `images`) batches, in order."""
    centred = images.with_transform(center_transform(preprocess))
    return build_loader(_Indexed(centred), batch_size, train=False, workers=workers)


def image_batches(
    images: Sequence[torch.Tensor], preprocess: EvalPreprocess, batch_size: int
) -> Batches:
    """The same batches of decoded uint8 images in memory (image files a user named)."""
    transform = center_transform(preprocess)
    return [
        (torch.stack([transform(image) for image in images[start : start + batch_size]]),
         torch.arange(start, min(start + batch_size, len(images))))
        for start in range(0, len(images), batch_size)
    ]
