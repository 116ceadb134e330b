"""The papers' preprocessing and training augmentation, as small named steps.

Steps take and return one image tensor C x H x W. Geometric steps (rescales, crops, flips)
work on uint8 and float alike; `ToFloat` maps uint8 to float32 in [0, 1]; colour steps
(`FancyPCA`, `Photometric`) and `Normalize` need float. Pipelines rescale first (cheap on
uint8), then convert, colour-augment, subtract the mean from the whole rescaled image and
only then crop, so the zero padding of the CIFAR crop is the mean colour (He et al. s4.2)
and AlexNet's 224 crops come from a mean-subtracted 256 x 256 image (Krizhevsky et al. s2).
Randomness comes from torch's global generator, which DataLoader seeds per worker.

Deviations from the papers (each also noted where it is implemented):
- Pixels are in [0, 1] and, by default, divided by the channel std (DataConfig.divide_std);
  the papers subtract the mean from 0-255 pixels.
- Fancy PCA adds sum_i alpha_i * lambda_i * p_i as the paper writes it, with lambda_i the RGB
  covariance eigenvalues of pixels in [0, 1] (the paper does not give units; in 0-255 units
  the shift would exceed the pixel range). ImageNet's published constants
  (stats.IMAGENET_PCA_EIGVAL) are in the same units and are applied the same way, as
  fb.resnet.torch does.
- The per-pixel mean image is computed at resize_size x resize_size and bilinearly resized
  to whatever size it is subtracted at (scale jitter, GoogLeNet crops), since the papers do
  not say how a fixed-size mean image meets variable-size inputs. GoogLeNet crops are taken
  before the mean subtraction (cheaper, and it usually uses the channel mean anyway).
- GoogLeNet's "photometric distortions" (Howard 2013) are not specified in the paper: random
  brightness, contrast and saturation factors in [1 - s, 1 + s], in random order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from canon.data.config import DataConfig
from canon.data.stats import DatasetStats, imagenet_channel_stats, imagenet_pca
from canon.errors import ConfigError

INTERPOLATION = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def resize_image(image: torch.Tensor, height: int, width: int, interpolation: str) -> torch.Tensor:
    if tuple(image.shape[-2:]) == (height, width):
        return image
    antialias = interpolation != "nearest"
    return TF.resize(image, [height, width], INTERPOLATION[interpolation], antialias=antialias)


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Height and width after an isotropic rescale that makes the shorter side `size`."""
    if height <= width:
        return size, max(size, round(width * size / height))
    return max(size, round(height * size / width)), size


class RescaleSquare:
    """AlexNet s2: rescale to size x size, ignoring the aspect ratio (the seed's description)."""

    def __init__(self, size: int, interpolation: str = "bilinear") -> None:
        self.size, self.interpolation = size, interpolation

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return resize_image(image, self.size, self.size, self.interpolation)

    def __repr__(self) -> str:
        return f"RescaleSquare({self.size})"


class RescaleShorter:
    """Isotropic rescale of the shorter side to S: fixed, or uniform in [low, high] per image
    (VGG s3.1 scale jittering, ResNet s3.4 scale augmentation)."""

    def __init__(self, low: int, high: int | None = None, interpolation: str = "bilinear") -> None:
        self.low, self.high, self.interpolation = low, high or low, interpolation

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        size = self.low
        if self.high > self.low:
            size = int(torch.randint(self.low, self.high + 1, ()).item())
        height, width = shorter_side_size(*image.shape[-2:], size)
        return resize_image(image, height, width, self.interpolation)

    def __repr__(self) -> str:
        scale = self.low if self.high == self.low else (self.low, self.high)
        return f"RescaleShorter({scale})"


class RandomCrop:
    """A random size x size crop, after zero padding of `padding` pixels (CIFAR: 4)."""

    def __init__(self, size: int, padding: int = 0) -> None:
        self.size, self.padding = size, padding

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.padding:
            image = F.pad(image, [self.padding] * 4)
        height, width = image.shape[-2:]
        if min(height, width) < self.size:
            raise ConfigError(f"cannot crop {self.size}x{self.size} from a {height}x{width} image")
        top = int(torch.randint(0, height - self.size + 1, ()).item())
        left = int(torch.randint(0, width - self.size + 1, ()).item())
        return image[..., top : top + self.size, left : left + self.size]

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, padding={self.padding})"


def crop_box(image: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    return image[..., top : top + size, left : left + size]


class CenterCrop:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        if min(height, width) < self.size:
            raise ConfigError(f"cannot crop {self.size}x{self.size} from a {height}x{width} image")
        return crop_box(image, (height - self.size) // 2, (width - self.size) // 2, self.size)

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class RandomFlip:
    """Horizontal reflection with probability 1/2 (every paper)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.flip(-1) if torch.rand(()) < 0.5 else image

    def __repr__(self) -> str:
        return "RandomFlip()"


class RandomAreaCrop:
    """GoogLeNet s6: a crop of area fraction in `area_range` and aspect ratio in
    `aspect_range` (log-uniform), resized to size x size; after 10 failed draws, the largest
    centred crop with a ratio in range."""

    def __init__(
        self,
        size: int,
        area_range: tuple[float, float] = (0.08, 1.0),
        aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bilinear",
    ) -> None:
        self.size, self.area_range, self.aspect_range = size, area_range, aspect_range
        self.interpolation = interpolation

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width)."""
        log_low, log_high = (math.log(r) for r in self.aspect_range)
        for _ in range(10):
            area = height * width * float(torch.empty(()).uniform_(*self.area_range))
            ratio = math.exp(float(torch.empty(()).uniform_(log_low, log_high)))
            crop_w = round(math.sqrt(area * ratio))
            crop_h = round(math.sqrt(area / ratio))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(torch.randint(0, height - crop_h + 1, ()).item())
                left = int(torch.randint(0, width - crop_w + 1, ()).item())
                return top, left, crop_h, crop_w
        ratio = min(max(width / height, self.aspect_range[0]), self.aspect_range[1])
        crop_w = min(width, round(height * ratio))
        crop_h = min(height, round(crop_w / ratio))
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, crop_h, crop_w = self.box(*image.shape[-2:])
        patch = image[..., top : top + crop_h, left : left + crop_w]
        return resize_image(patch, self.size, self.size, self.interpolation)

    def __repr__(self) -> str:
        return f"RandomAreaCrop({self.size}, area={self.area_range}, aspect={self.aspect_range})"


class ToFloat:
    """uint8 [0, 255] -> float32 [0, 1]; float input passes through."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype == torch.uint8:
            return image.to(torch.float32).div_(255)
        return image.float()

    def __repr__(self) -> str:
        return "ToFloat()"


class FancyPCA:
    """AlexNet s4.1: add sum_i alpha_i * lambda_i * p_i to every pixel, alpha_i ~ N(0, std^2)
    drawn once per call (once per image per epoch); p_i are the columns of `eigvec`."""

    def __init__(self, eigvec: torch.Tensor, eigval: torch.Tensor, alpha_std: float) -> None:
        self.eigvec, self.eigval, self.alpha_std = eigvec.float(), eigval.float(), alpha_std

    def noise(self) -> torch.Tensor:
        """The RGB shift for one image (3,)."""
        alpha = torch.randn(3) * self.alpha_std
        return self.eigvec @ (alpha * self.eigval)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image + self.noise().view(3, 1, 1)

    def __repr__(self) -> str:
        return f"FancyPCA(alpha_std={self.alpha_std})"


class Photometric:
    """Random brightness, contrast and saturation factors in [1 - s, 1 + s], random order."""

    def __init__(self, strength: float) -> None:
        self.strength = strength

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        for which in torch.randperm(3).tolist():
            factor = float(torch.empty(()).uniform_(1 - self.strength, 1 + self.strength))
            grey = (image * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)
            if which == 0:
                image = image * factor
            elif which == 1:
                image = (image - grey.mean()) * factor + grey.mean()
            else:
                image = (image - grey) * factor + grey
        return image.clamp(0, 1)

    def __repr__(self) -> str:
        return f"Photometric({self.strength})"


class Normalize:
    """Subtract a channel mean (3,) or a mean image (3 x S x S, bilinearly resized to the
    input's size), then divide by a channel std when given."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor | None = None) -> None:
        self.mean = mean.float() if mean.dim() == 3 else mean.float().view(3, 1, 1)
        self.std = None if std is None else std.float().view(3, 1, 1)
        self._resized: dict[tuple[int, int], torch.Tensor] = {}

    def mean_at(self, height: int, width: int) -> torch.Tensor:
        if self.mean.shape[-2:] == (1, 1) or tuple(self.mean.shape[-2:]) == (height, width):
            return self.mean
        key = (height, width)
        if key not in self._resized:
            if len(self._resized) > 64:  # scale jitter makes many sizes; keep memory bounded
                self._resized.clear()
            self._resized[key] = TF.resize(self.mean, [height, width], antialias=True)
        return self._resized[key]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = image - self.mean_at(*image.shape[-2:])
        return image / self.std if self.std is not None else image

    def __repr__(self) -> str:
        kind = "image" if self.mean.shape[-1] > 1 else "channel"
        return f"Normalize(mean={kind}, std={'yes' if self.std is not None else 'no'})"


class Compose:
    def __init__(self, steps: Sequence) -> None:
        self.steps = list(steps)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            image = step(image)
        return image

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(s) for s in self.steps) + ")"


# ---------------------------------------------------------------------------------------------
# Pipelines


def needs_stats(config: DataConfig) -> bool:
    """Whether the training set's statistics are needed (else no pass over the data)."""
    uses_pca = config.pca_std > 0 and config.pca_source == "dataset"
    return config.mean in ("pixel", "channel") or uses_pca


def make_normalize(config: DataConfig, stats: DatasetStats | None) -> Normalize:
    if config.mean == "imagenet":
        mean, std = imagenet_channel_stats()
    else:
        if stats is None:
            raise ConfigError(f"data.mean={config.mean!r} needs the training set's statistics")
        mean = stats.mean_image if config.mean == "pixel" else stats.channel_mean
        std = stats.channel_std
    return Normalize(mean, std if config.divide_std else None)


def make_fancy_pca(config: DataConfig, stats: DatasetStats | None) -> FancyPCA:
    if config.pca_source == "imagenet":
        eigval, eigvec = imagenet_pca()
        return FancyPCA(eigvec, eigval, config.pca_std)
    if stats is None:
        raise ConfigError("data.pca_source='dataset' needs the training set's statistics")
    return FancyPCA(stats.pca_eigvec, stats.pca_eigval, config.pca_std)


@dataclass
class EvalPreprocess:
    """Test-time preprocessing shared by every view: rescale, then to float and normalise.

    AlexNet rescales to a square; the others rescale the shorter side isotropically."""

    square: bool
    crop_size: int
    resize_size: int
    normalize: Normalize
    interpolation: str = "bilinear"
    # Shorter sides for multi-scale protocols (DataConfig.multi_scale_test_sizes).
    scales: tuple[int, ...] = ()

    def rescale(self, image: torch.Tensor, size: int | None = None) -> torch.Tensor:
        size = size or self.resize_size
        if self.square:
            return resize_image(image, size, size, self.interpolation)
        return resize_image(image, *shorter_side_size(*image.shape[-2:], size), self.interpolation)

    def __call__(self, image: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """The rescaled, normalised float image (before any crop)."""
        return self.normalize(ToFloat()(self.rescale(image, size)))


def training_transform(config: DataConfig, stats: DatasetStats | None) -> Compose:
    """The named paper pipeline (DataConfig.augmentation) for training images."""
    name = config.augmentation
    if name == "none":
        return center_transform(eval_preprocess(config, stats))
    colour = []
    if name == "googlenet" and config.photometric > 0:
        colour.append(Photometric(config.photometric))
    if config.pca_std > 0:
        colour.append(make_fancy_pca(config, stats))
    flip = [RandomFlip()] if config.flip else []
    normalize = make_normalize(config, stats)
    if name == "googlenet":
        crop = RandomAreaCrop(config.crop_size, config.area_range, config.aspect_range,
                              config.interpolation)
        return Compose([crop, ToFloat(), *colour, normalize, *flip])
    if name == "alexnet":
        rescale = RescaleSquare(config.resize_size, config.interpolation)
    else:  # vgg, resnet, cifar
        low, high = config.scale_range or (config.resize_size, config.resize_size)
        rescale = RescaleShorter(low, high, config.interpolation)
    padding = config.padding if name == "cifar" else 0
    crop = RandomCrop(config.crop_size, padding)
    return Compose([rescale, ToFloat(), *colour, normalize, crop, *flip])


def eval_preprocess(config: DataConfig, stats: DatasetStats | None) -> EvalPreprocess:
    return EvalPreprocess(
        square=config.augmentation == "alexnet",
        crop_size=config.crop_size,
        resize_size=config.resize_size,
        normalize=make_normalize(config, stats),
        interpolation=config.interpolation,
        scales=config.multi_scale_test_sizes(),
    )


def center_transform(preprocess: EvalPreprocess) -> Compose:
    """The single-crop test transform: rescale, normalise, centre crop."""
    return Compose([preprocess, CenterCrop(preprocess.crop_size)])
