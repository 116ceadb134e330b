"""Input-pipeline speed: canon's JPEG training pipeline against torchvision's standard one
doing the same geometry, in images per second per CPU core.

canon: the training set canon.data.loaders.build_datasets gives for a recipe's data section,
its training split alone read (build_training_set; torchvision.io decoding, then
canon.data.transforms.training_transform). torchvision: ImageFolder over the same folder
(PIL decoding) with transforms.v2, the geometry of each canon augmentation:

- googlenet: RandomResizedCrop(crop_size, area_range, aspect_range); interpolation jitter as a
  RandomChoice of one crop per filter.
- resnet, vgg: RandomShortestSize(scale_range) (Resize(resize_size) without one), RandomCrop.
- alexnet, zfnet: Resize(resize_size) and CenterCrop(resize_size) (alexnet_resize "squash":
  Resize to a square), then RandomCrop. ZFNet takes one of five fixed crops, which torchvision
  has no transform for: a random crop of the same size costs the same.
- none: Resize(resize_size), CenterCrop(crop_size).

Then the flip, float conversion and normalisation. Colour augmentation is off in both (fancy PCA
and the photometric distortions: torchvision has no fancy PCA). Where canon subtracts the
training set's mean image or channel mean (data.mean pixel or channel), torchvision normalises
with ImageNet's channel constants, its usual practice: the mean image, resampled to each crop,
is work only canon does. canon's "area" filter becomes PIL's box filter.

One process, one thread, no DataLoader workers; the same images (spread evenly over the
training split) by index in both, repeats alternating, the median reported.

With a device (`--device cuda`), canon's on-device path (train.decode_on_device) is timed too
on the same images: each batch's files read, decoded together (nvJPEG on a GPU) and cropped,
shifted, normalised and reflected there (canon.data.device_jpeg), the device's queued work
waited for at the end. Only recipes with an on-device form get the figure.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode, v2

from canon.bench import DEFAULT_RECIPE
from canon.bench.train import synchronize
from canon.data.config import DataConfig
from canon.data.device_jpeg import DeviceCrops, DeviceDecodedBatches, FileBytes, collate_files
from canon.data.folders import FolderImages
from canon.data.geometry import INTERPOLATION
from canon.data.loaders import build_training_set
from canon.data.shard_index import is_shard_folder, read_index
from canon.data.stats import imagenet_channel_stats
from canon.data.transforms import INTERPOLATION_JITTER
from canon.devices import resolve_device
from canon.errors import ConfigError, DataError
from canon.recipes import list_recipes, load_recipe

MODES = INTERPOLATION | {"area": InterpolationMode.BOX}


@dataclass(frozen=True)
class DataBench:
    """One recipe's pipelines, in images per second on one core."""

    recipe: str
    augmentation: str
    images: int
    repeats: int
    canon_images_per_s: float
    torchvision_images_per_s: float
    on_device_images_per_s: float | None = None  # canon's on-device path, when asked for

    @property
    def ratio(self) -> float:
        """canon images/s over torchvision's."""
        return self.canon_images_per_s / self.torchvision_images_per_s

    def to_dict(self) -> dict:
        return asdict(self) | {"ratio": self.ratio}


@dataclass(frozen=True)
class Pipelines:
    """Both training sets, and the positions of the same image files in each."""

    canon: Dataset
    torchvision: ImageFolder
    canon_indices: list[int]
    torchvision_indices: list[int]


def imagenet_recipes() -> list[str]:
    """The bundled recipes with an ImageNet-style pipeline (every augmentation but cifar)."""
    return [name for name in list_recipes() if load_recipe(name).data.augmentation != "cifar"]


def bench_config(recipe: str, data: str | Path) -> DataConfig:
    """The recipe's data section on `data`, colour augmentation off, no held-out split."""
    if not Path(data).is_dir():  # not a dataset name: cifar10 would be downloaded
        raise ConfigError(f"--data must be an image folder (train/<class>/...), got {data}")
    config = load_recipe(recipe).data
    if config.augmentation == "cifar":
        raise ConfigError(f"recipe {recipe} trains on CIFAR tensors, not JPEGs; "
                          f"canon bench data compares {', '.join(imagenet_recipes())}")
    return replace(config, dataset=str(data), pca_std=0.0, photometric=0.0, val_split=0)


def torchvision_transform(config: DataConfig) -> v2.Compose:
    """torchvision's standard pipeline with the geometry of canon's `config.augmentation`."""
    crop, resize = config.crop_size, config.resize_size
    mode = MODES[config.interpolation]
    name = config.augmentation
    if name == "googlenet":
        filters = INTERPOLATION_JITTER if config.interpolation_jitter else (config.interpolation,)
        crops = [v2.RandomResizedCrop(crop, scale=config.area_range, ratio=config.aspect_range,
                                      interpolation=MODES[f]) for f in filters]
        geometry = crops[:1] if len(crops) == 1 else [v2.RandomChoice(crops)]
    elif name in ("resnet", "vgg"):
        low, high = config.scale_range or (resize, resize)
        rescale = (v2.RandomShortestSize(list(range(low, high + 1)), interpolation=mode)
                   if high > low else v2.Resize(low, interpolation=mode))
        geometry = [rescale, v2.RandomCrop(crop)]
    elif name in ("alexnet", "zfnet"):
        fit = ([v2.Resize((resize, resize), interpolation=mode)]
               if config.image_fit() == "squash"
               else [v2.Resize(resize, interpolation=mode), v2.CenterCrop(resize)])
        geometry = [*fit, v2.RandomCrop(crop)]
    elif name == "none":
        geometry = [v2.Resize(resize, interpolation=mode), v2.CenterCrop(crop)]
    else:
        raise ConfigError(f"no torchvision pipeline for the {name} augmentation")
    flip = [v2.RandomHorizontalFlip()] if config.flip and name != "none" else []
    mean, std = imagenet_channel_stats()
    return v2.Compose([
        *geometry, *flip, v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean.tolist(), std.tolist() if config.divide_std else [1.0, 1.0, 1.0]),
    ])


def pipelines(
    config: DataConfig, images: int, folder: ImageFolder | None = None
) -> Pipelines:
    """canon's training set for `config`, torchvision's over the same folder (`folder`, its
    scan reused, or a new ImageFolder), and `images` files spread evenly over both, less those
    canon cannot decode."""
    canon = build_training_set(config)
    root, paths = getattr(canon, "root", None), getattr(canon, "paths", None)
    if root is None or paths is None:  # a folder of CIFAR batches
        raise ConfigError(f"{config.dataset} holds no image files (train/<class>/...)")
    if folder is None or Path(folder.root) != Path(root):
        folder = ImageFolder(str(root))
    folder.transform = torchvision_transform(config)
    count = min(images, len(paths))
    spread = [round(i * (len(paths) - 1) / max(count - 1, 1)) for i in range(count)]
    # Both time the files canon decodes: canon skips (and warns of) the others, PIL would raise.
    canon_indices = [i for i in spread if canon[i] is not None]
    if not canon_indices:
        raise DataError(f"none of the {count} files chosen from {root} decodes (see the warnings)")
    position = {Path(path): i for i, (path, _) in enumerate(folder.samples)}
    missing = [paths[i] for i in canon_indices if Path(paths[i]) not in position]
    if missing:
        raise ConfigError(f"torchvision's ImageFolder does not list {missing[0]} "
                          f"({len(missing)} such files)")
    tv_indices = [position[Path(paths[i])] for i in canon_indices]
    return Pipelines(canon, folder, canon_indices, tv_indices)


def images_per_second(dataset: Dataset, indices: Sequence[int]) -> float:
    """One pass over `indices`: decoding and transforming each image, from the same seed."""
    torch.manual_seed(0)
    start = time.perf_counter()
    for index in indices:
        dataset[index]
    return len(indices) / (time.perf_counter() - start)


def on_device_images_per_second(folder: FolderImages, indices: Sequence[int],
                                 device: torch.device, batch_size: int) -> float | None:
    """One pass of canon's on-device path over `indices`, `batch_size` files at a time: read,
    decoded together and augmented on `device`; None for a pipeline without that form."""
    augment = DeviceCrops.of(folder.transform)
    if augment is None:
        return None
    files = FileBytes(folder)
    batches = (collate_files([files[i] for i in indices[first : first + batch_size]])
               for first in range(0, len(indices), batch_size))  # read as the loop asks
    synchronize(device)
    start = time.perf_counter()
    for _ in DeviceDecodedBatches(batches, folder, augment, 0, device):
        pass
    synchronize(device)
    return len(indices) / (time.perf_counter() - start)


def bench_data(
    data: str | Path, recipes: Sequence[str] = (DEFAULT_RECIPE,), images: int = 500,
    repeats: int = 5, device: str | None = None, batch_size: int = 256,
) -> list[DataBench]:
    """canon's and torchvision's pipelines for each recipe on the dataset folder `data`, on
    one thread (torch's thread count is restored afterwards), and canon's on-device path on
    `device` in batches of `batch_size` when a device is given."""
    if images < 1 or repeats < 1 or batch_size < 1:
        raise ConfigError(f"--images, --repeats and --batch-size must be at least 1, got "
                          f"{images}, {repeats}, {batch_size}")
    configs = [bench_config(recipe, data) for recipe in recipes]  # bad names fail first
    if is_shard_folder(data):  # torchvision's baseline reads image files
        raise ConfigError(
            f"{data}: a shard folder; canon bench data times canon's pipelines against "
            "torchvision's on an image folder's files (--data "
            f"{read_index(Path(data)).source}, the folder it was packed from). bench/"
            "bench_shards.py times the shard reader against the folder reader")
    target = None if device is None else torch.device(resolve_device(device))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results, folder = [], None
    try:
        for recipe, config in zip(recipes, configs, strict=True):
            sets = pipelines(config, images, folder)
            folder = sets.torchvision
            rates: dict[str, list[float]] = {"canon": [], "torchvision": [], "device": []}
            on_device = target is not None and isinstance(sets.canon, FolderImages)
            if on_device:  # one batch untimed: the decoder's set-up is no part of a pass
                on_device_images_per_second(sets.canon, sets.canon_indices[:batch_size],
                                            target, batch_size)
            for _ in range(repeats):
                rates["canon"].append(images_per_second(sets.canon, sets.canon_indices))
                rates["torchvision"].append(
                    images_per_second(sets.torchvision, sets.torchvision_indices))
                if on_device:
                    rate = on_device_images_per_second(sets.canon, sets.canon_indices, target,
                                                       batch_size)
                    rates["device"] += [] if rate is None else [rate]
            results.append(DataBench(
                recipe, config.augmentation, len(sets.canon_indices), repeats,
                statistics.median(rates["canon"]), statistics.median(rates["torchvision"]),
                statistics.median(rates["device"]) if rates["device"] else None,
            ))
    finally:
        torch.set_num_threads(threads)
    return results


def format_data(results: Sequence[DataBench], data: str | Path, device: str | None = None,
                batch_size: int = 256) -> str:
    """The table the command prints."""
    first = results[0]
    column = f"on {resolve_device(device)}" if device is not None else ""
    lines = [
        f"{first.images} training images of {data}, one thread, no workers, median of "
        f"{first.repeats} repeats; images/s (per core), colour augmentation off",
        f"{'recipe':<24}{'augmentation':<14}{'canon':>9}{'torchvision':>13}{'canon/tv':>10}"
        + (f"{column:>14}" if column else ""),
    ]
    for r in results:
        rate = r.on_device_images_per_s
        on_device = "" if device is None else f"{'-' if rate is None else f'{rate:.1f}':>14}"
        lines.append(f"{r.recipe:<24}{r.augmentation:<14}{r.canon_images_per_s:>9.1f}"
                     f"{r.torchvision_images_per_s:>13.1f}{r.ratio:>10.3f}{on_device}")
    if device is not None:
        lines.append(f"{column}: canon's on-device path (train.decode_on_device), batches of "
                     f"{batch_size} files read, decoded together and augmented there; "
                     "-: no on-device form")
    return "\n".join(lines)
