"""Pixel values: uint8 to float in [0, 1] and the papers' mean subtraction (the training set's
mean image, AlexNet s2 and ResNet s3.4/s4.2, or its channel mean, VGG s2.1, or ImageNet's
published constants), and, when asked (DataConfig.divide_std), division by the channel
standard deviation, or (DataConfig.pixel_scale) the papers' 0-255 scale.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from torchvision.transforms.v2 import functional as TF

from canon.data.config import DataConfig
from canon.data.geometry import resample_window
from canon.data.stats import DatasetStats, imagenet_channel_stats
from canon.errors import ConfigError, DataError, first_line

# A trained model's normalisation, beside its model.safetensors: {"mean": (3,) or 3 x S x S,
# "std": (3,), absent where it divides by none}.
NORMALIZATION_FILE = "normalization.safetensors"
EXPORT_TAG = "canon_export"  # the id an export's files share (canon.engine.checkpoint)


class ToFloat:
    """uint8 [0, 255] -> float32 [0, 1]; float input passes through."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype == torch.uint8:
            return image.to(torch.float32).div_(255)
        return image.float()

    def __repr__(self) -> str:
        return "ToFloat()"


class Normalize:
    """Subtract a channel mean (3,) or a mean image (3 x S x S, resampled to the input's
    size), then divide by a channel std when given.

    The papers subtract the mean from 0-255 pixels: DataConfig.pixel_scale 255 gives their
    values as a std of 1/255. The papers do not say how a fixed-size mean image meets inputs
    of other sizes (scale jitter, GoogLeNet crops, test scales): here it is resampled to them
    (antialiased bilinear, as TF.resize)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor | None = None) -> None:
        self.mean = mean.float() if mean.dim() == 3 else mean.float().view(3, 1, 1)
        self.std = None if std is None else std.float().view(3, 1, 1)
        self._resized = {tuple(self.mean.shape[-2:]): self.mean}

    def mean_at(
        self, height: int, width: int, inside: tuple[int, int, int, int] | None = None
    ) -> torch.Tensor:
        """The mean for a height x width image, or for its window `inside` = (top, left, rows,
        columns): the mean image as resampled to height x width, computed only inside
        unless that size was resampled whole before."""
        if self.mean.shape[-2:] == (1, 1):
            return self.mean
        if inside is None:  # whole images: a few sizes recur (GoogLeNet crops, test scales)
            if (height, width) not in self._resized:
                if len(self._resized) > 64:  # scale jitter makes many sizes; bound the memory
                    self._resized = {tuple(self.mean.shape[-2:]): self.mean}
                self._resized[height, width] = TF.resize(self.mean, [height, width],
                                                         antialias=True)
            return self._resized[height, width]
        if (height, width) in self._resized:
            top, left, rows, columns = inside
            return self._resized[height, width][:, top : top + rows, left : left + columns]
        return resample_window(self.mean, height, width, inside)

    def __call__(
        self, image: torch.Tensor, within: tuple[int, int, int, int] | None = None
    ) -> torch.Tensor:
        """`within` = (height, width, top, left): `image` is the window at (top, left) of a
        height x width image, and gets the mean image of that size at that window."""
        if within is None:
            mean = self.mean_at(*image.shape[-2:])
        else:
            height, width, top, left = within
            mean = self.mean_at(height, width, (top, left, *image.shape[-2:]))
        image = image - mean
        return image / self.std if self.std is not None else image

    def __repr__(self) -> str:
        kind = "image" if self.mean.shape[-1] > 1 else "channel"
        return f"Normalize(mean={kind}, std={'yes' if self.std is not None else 'no'})"


# DataConfig.mean's published constants: (channel mean, channel std), in [0, 1] RGB.
PUBLISHED = {
    "imagenet": imagenet_channel_stats,
    "inception": lambda: (torch.full((3,), 0.5), torch.full((3,), 0.5)),
}


def published_mean(normalize: Normalize) -> str | None:
    """The DataConfig.mean whose published constants `normalize` applies, if any."""
    if normalize.std is None or normalize.mean.shape[-2:] != (1, 1):
        return None
    return next((name for name, constants in PUBLISHED.items()
                 if all(torch.allclose(ours.flatten(), theirs, atol=1e-6) for ours, theirs
                        in zip((normalize.mean, normalize.std), constants(), strict=True))),
                None)


def make_normalize(config: DataConfig, stats: DatasetStats | None) -> Normalize:
    """The normalisation DataConfig.mean names: ImageNet's published channel mean and std, or
    the training set's `stats`, whose mean image is of its images fitted to resize_size x
    resize_size (canon.data.stats.mean_image_fit: AlexNet's and ZFNet's central squares,
    else squashed). The std divides only with DataConfig.divide_std; without it
    DataConfig.pixel_scale 255 multiplies (a std of 1/255), so that every path that
    normalises (per image, per batch, on the device, at evaluation and after export) gives
    the papers' 0-255 values. DataConfig.normalization_from replaces all of this with a
    trained model's own."""
    if config.normalization_from is not None:
        return stored_normalization(config.normalization_from)
    if config.mean in PUBLISHED:
        mean, std = PUBLISHED[config.mean]()
    else:
        if stats is None:
            raise ConfigError(f"data.mean={config.mean!r} needs the training set's statistics")
        mean = stats.mean_image if config.mean == "pixel" else stats.channel_mean
        std = stats.channel_std
    if config.divide_std:
        return Normalize(mean, std)
    return Normalize(mean, None if config.pixel_scale == 1
                     else torch.full((3,), 1 / config.pixel_scale))


def stored_normalization(source: str | Path) -> Normalize:
    """The normalisation a trained model's inputs had: from its normalization.safetensors, the
    run directory or model.safetensors it sits beside, or a training checkpoint (.pt or any
    other name)."""
    path = Path(source)
    if path.is_dir() or (path.suffix == ".safetensors" and path.name != NORMALIZATION_FILE):
        model = path / "model.safetensors" if path.is_dir() else path
        path = model.parent / NORMALIZATION_FILE
        if path.is_file() and model.is_file() and _other_exports(path, model):
            raise DataError(f"data.normalization_from: {path} was not exported with {model} "
                            "(another export's file, copied beside it): name the model's own "
                            f"{NORMALIZATION_FILE}")
    try:
        if path.suffix != ".safetensors":  # a checkpoint, whatever it is named (.pt, .pth)
            stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            stored = stored["normalization"]
            if stored is None:
                raise KeyError("its run normalised nothing: it trained on ready tensors")
        else:
            stored = safetensors.torch.load_file(path)
        mean, std = stored["mean"], stored.get("std")
    except Exception as error:  # missing, truncated, foreign: any of a dozen errors
        raise DataError(
            f"data.normalization_from: no normalisation readable from {path} "
            f"({first_line(error)}): name a trained run directory, its model.safetensors or "
            f"{NORMALIZATION_FILE}, or a checkpoint .pt; or set data.normalization_from to null "
            "to normalise by data.mean's statistics of this training set") from None
    return Normalize(mean, std)


def export_id(path: Path) -> str | None:
    """The export id a safetensors file carries (EXPORT_TAG), None for none (raises what
    safetensors raises for a file it cannot read)."""
    with safetensors.safe_open(path, "pt") as file:
        return (file.metadata() or {}).get(EXPORT_TAG)


def _other_exports(normalization: Path, model: Path) -> bool:
    """Whether the two files carry different export ids (files without one, or unreadable
    ones, which the loading reports, are not compared)."""
    try:
        ids = {export_id(normalization), export_id(model)}
    except Exception:  # any reading error: no verdict (the loading reports it)
        return False
    return None not in ids and len(ids) == 2
