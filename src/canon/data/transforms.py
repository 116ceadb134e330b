"""The papers' preprocessing and training augmentation, as small named steps.

Steps take and return one image tensor C x H x W. Geometric steps (rescales, crops, flips)
work on uint8 and float alike; `ToFloat` maps uint8 to float32 in [0, 1]; colour steps
(`FancyPCA`, `Photometric`) and `Normalize` need float. The rescale-and-crop pipelines
(`CropFirst`: alexnet, zfnet, vgg, resnet, cifar) rescale the uint8 image, cut the crop from
it, and only then convert, colour-shift and subtract the mean image cropped at the same box.
That gives exactly what subtracting the mean from the whole rescaled image and then cropping
gives (the order the papers describe: the zero padding of the CIFAR crop is the mean colour,
He et al. s4.2; AlexNet's 224 crops come from a mean-subtracted 256 x 256 image, Krizhevsky
et al. s2), with the float work done on the crop alone (bench/bench_pipelines.py).
Randomness comes from torch's global generator, which DataLoader seeds per worker.

Deviations from the papers (each also noted where it is implemented):
- Pixels are in [0, 1] and, by default, divided by the channel std (DataConfig.divide_std);
  the papers subtract the mean from 0-255 pixels.
- Fancy PCA adds sum_i alpha_i * lambda_i * p_i as the paper writes it, with lambda_i the RGB
  covariance eigenvalues of pixels in [0, 1] (the paper does not give units; in 0-255 units
  the shift would exceed the pixel range). ImageNet's published constants
  (stats.IMAGENET_PCA_EIGVAL) are in the same units and are applied the same way, as
  fb.resnet.torch does.
- The per-pixel mean image is computed at resize_size x resize_size and resampled
  (antialiased bilinear, as TF.resize) to whatever size it is subtracted at (scale jitter,
  GoogLeNet crops), since the papers do not say how a fixed-size mean image meets
  variable-size inputs. GoogLeNet crops are taken before the mean subtraction (cheaper, and
  it usually uses the channel mean anyway). ZFNet's mean image is that of the images squashed
  to 256 x 256 (canon's one statistics pass), not of their centre 256 x 256 squares.
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


def check_crop(height: int, width: int, size: int) -> None:
    """Refuse size x size crops of a smaller image."""
    if min(height, width) < size:
        raise ConfigError(f"cannot take {size}x{size} crops of a {height}x{width} image")


def center_box(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of the centred size x size window of a height x width image."""
    check_crop(height, width, size)
    return (height - size) // 2, (width - size) // 2


def five_crop_boxes(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """(top, left) of the top-left, top-right, bottom-left, bottom-right and centre windows
    (AlexNet s4.1's test crops, Zeiler & Fergus s3's training crops)."""
    top, left = center_box(height, width, size)
    bottom, right = height - size, width - size
    return [(0, 0), (0, right), (bottom, 0), (bottom, right), (top, left)]


def crop_box(image: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    return image[..., top : top + size, left : left + size]


def overlap(
    top: int, left: int, size: int, height: int, width: int
) -> tuple[tuple[int, int, int, int], list[int]]:
    """A size x size window at (top, left), which may overhang a height x width image: the
    part inside as (top, left, rows, columns), and the zero padding that completes it
    ([left, right, top, bottom], F.pad's order)."""
    inner_top, inner_left = max(top, 0), max(left, 0)
    bottom, right = min(top + size, height), min(left + size, width)
    inside = (inner_top, inner_left, bottom - inner_top, right - inner_left)
    return inside, [inner_left - left, left + size - right, inner_top - top, top + size - bottom]


def cut(image: torch.Tensor, inside: tuple[int, int, int, int]) -> torch.Tensor:
    top, left, rows, columns = inside
    return image[..., top : top + rows, left : left + columns]


class RandomCrop:
    """A random size x size window of the image zero-padded by `padding` pixels (CIFAR: 4)."""

    def __init__(self, size: int, padding: int = 0) -> None:
        self.size, self.padding = size, padding

    def box(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) in the unpadded image's coordinates, so from -padding on."""
        check_crop(height + 2 * self.padding, width + 2 * self.padding, self.size)
        top = int(torch.randint(0, height + 2 * self.padding - self.size + 1, ()).item())
        left = int(torch.randint(0, width + 2 * self.padding - self.size + 1, ()).item())
        return top - self.padding, left - self.padding

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        inside, padding = overlap(*self.box(height, width), self.size, height, width)
        window = cut(image, inside)
        return F.pad(window, padding) if any(padding) else window

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, padding={self.padding})"


class FixedCropChoice:
    """Zeiler & Fergus s3: one of the five size x size crops (corners and centre) of the
    centred region x region square, uniformly per image; with RandomFlip, one of the ten
    "sub-crops of size 224x224 (corners + center with(out) horizontal flips)"."""

    def __init__(self, size: int, region: int) -> None:
        check_crop(region, region, size)
        self.size, self.region = size, region

    def boxes(self, height: int, width: int) -> list[tuple[int, int]]:
        top, left = center_box(height, width, self.region)
        corners = five_crop_boxes(self.region, self.region, self.size)
        return [(top + down, left + right) for down, right in corners]

    def box(self, height: int, width: int) -> tuple[int, int]:
        return self.boxes(height, width)[int(torch.randint(0, 5, ()).item())]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return crop_box(image, *self.box(*image.shape[-2:]), self.size)

    def __repr__(self) -> str:
        return f"FixedCropChoice({self.size}, region={self.region})"


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


_LUMA_WEIGHTS = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)  # ITU-R BT.601 greyscale


class Photometric:
    """Random brightness, contrast and saturation factors in [1 - s, 1 + s], random order."""

    def __init__(self, strength: float) -> None:
        self.strength = strength

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        for which in torch.randperm(3).tolist():
            factor = float(torch.empty(()).uniform_(1 - self.strength, 1 + self.strength))
            if which == 0:
                image = image * factor
                continue
            grey = (image * _LUMA_WEIGHTS).sum(0)
            if which == 1:
                grey = grey.mean()
            image = (image - grey) * factor + grey
        return image.clamp(0, 1)

    def __repr__(self) -> str:
        return f"Photometric({self.strength})"


def resampling_taps(
    source: int, target: int, start: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and weights (count x taps) of outputs start .. start + count - 1 when
    `source` samples are resampled to `target`: torch's antialiased bilinear filter (a
    triangle, widened by the scale when shrinking), computed in float32 as torch does, so
    resampling through them matches TF.resize(..., antialias=True) to float rounding."""
    scale = torch.tensor(source / target, dtype=torch.float32)
    support = scale.clamp(min=1.0)
    centers = (torch.arange(start, start + count, dtype=torch.float32) + 0.5) * scale
    first = (centers - support + 0.5).long().clamp(min=0)
    index = first[:, None] + torch.arange(math.ceil(2 * float(support)) + 1)
    weight = (1 - ((index - centers[:, None] + 0.5) / support).abs()).clamp(min=0)
    weight[index >= source] = 0
    return index.clamp(max=source - 1), weight / weight.sum(1, keepdim=True)


def resample_rows(image: torch.Tensor, target: int, start: int, count: int) -> torch.Tensor:
    """Rows start .. start + count - 1 of `image` (C x H x W) resampled to `target` rows, as
    TF.resize(..., antialias=True) computes them (resampling_taps), without the others."""
    if image.shape[1] == target:
        return image[:, start : start + count]
    index, weight = resampling_taps(image.shape[1], target, start, count)
    rows = image.index_select(1, index[:, 0]) * weight[:, 0, None]
    for tap in range(1, index.shape[1]):  # a weighted sum of whole rows: contiguous copies
        rows.addcmul_(image.index_select(1, index[:, tap]), weight[:, tap, None])
    return rows


class Normalize:
    """Subtract a channel mean (3,) or a mean image (3 x S x S, resampled to the input's
    size), then divide by a channel std when given."""

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
        top, left, rows, columns = inside
        if (height, width) in self._resized:
            return self._resized[height, width][:, top : top + rows, left : left + columns]
        window = resample_rows(self.mean, height, top, rows).transpose(1, 2).contiguous()
        return resample_rows(window, width, left, columns).transpose(1, 2)

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


class Compose:
    def __init__(self, steps: Sequence) -> None:
        self.steps = list(steps)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            image = step(image)
        return image

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(s) for s in self.steps) + ")"


class CropFirst:
    """Rescale; draw the colour shift, then the crop box; cut the crop from the uint8 image;
    to float, shift, subtract the mean image at the crop's box, zero-pad where the crop
    overhangs (CIFAR), reflect. Equals normalising the whole rescaled image and cropping
    it afterwards, with the same random draws in the same order (see the module docstring)."""

    def __init__(
        self,
        rescale: RescaleSquare | RescaleShorter,
        crop: RandomCrop | FixedCropChoice,
        normalize: Normalize,
        fancy_pca: FancyPCA | None = None,
        flip: bool = True,
    ) -> None:
        self.rescale, self.crop, self.normalize = rescale, crop, normalize
        self.fancy_pca, self.flip = fancy_pca, RandomFlip() if flip else None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = self.rescale(image)
        shift = self.fancy_pca.noise().view(3, 1, 1) if self.fancy_pca is not None else None
        height, width = image.shape[-2:]
        inside, padding = overlap(*self.crop.box(height, width), self.crop.size, height, width)
        window = ToFloat()(cut(image, inside))
        if shift is not None:
            window = window + shift
        window = self.normalize(window, (height, width, inside[0], inside[1]))
        if any(padding):
            window = F.pad(window, padding)
        return self.flip(window) if self.flip is not None else window

    def __repr__(self) -> str:
        steps = [self.rescale, self.crop, self.fancy_pca, self.normalize, self.flip]
        return "CropFirst(" + ", ".join(repr(s) for s in steps if s is not None) + ")"


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

    AlexNet rescales to a square; the others rescale the shorter side isotropically, and
    ZFNet (s3) then keeps the centred square, whose corners its ten crops take."""

    square: bool
    crop_size: int
    resize_size: int
    normalize: Normalize
    interpolation: str = "bilinear"
    # Shorter sides for multi-scale protocols (DataConfig.multi_scale_test_sizes).
    scales: tuple[int, ...] = ()
    center_square: bool = False

    def rescale(self, image: torch.Tensor, size: int | None = None) -> torch.Tensor:
        size = size or self.resize_size
        if self.square:
            return resize_image(image, size, size, self.interpolation)
        height, width = shorter_side_size(*image.shape[-2:], size)
        image = resize_image(image, height, width, self.interpolation)
        if self.center_square:
            return crop_box(image, *center_box(height, width, size), size)
        return image

    def __call__(self, image: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """The rescaled, normalised float image (before any crop)."""
        return self.normalize(ToFloat()(self.rescale(image, size)))

    def center(self, image: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """The normalised centre crop_size crop of the image rescaled to `size`; equals
        cropping self(image, size), with the float work done on the crop alone."""
        image = self.rescale(image, size)
        height, width = image.shape[-2:]
        top, left = center_box(height, width, self.crop_size)
        window = ToFloat()(crop_box(image, top, left, self.crop_size))
        return self.normalize(window, (height, width, top, left))


def training_transform(config: DataConfig, stats: DatasetStats | None) -> CropFirst | Compose:
    """The named paper pipeline (DataConfig.augmentation) for training images."""
    name = config.augmentation
    if name == "none":
        return center_transform(eval_preprocess(config, stats))
    normalize = make_normalize(config, stats)
    fancy_pca = make_fancy_pca(config, stats) if config.pca_std > 0 else None
    if name == "googlenet":
        colour = [Photometric(config.photometric)] if config.photometric > 0 else []
        colour += [fancy_pca] if fancy_pca is not None else []
        crop = RandomAreaCrop(config.crop_size, config.area_range, config.aspect_range,
                              config.interpolation)
        flip = [RandomFlip()] if config.flip else []
        return Compose([crop, ToFloat(), *colour, normalize, *flip])
    if name == "alexnet":
        rescale = RescaleSquare(config.resize_size, config.interpolation)
    else:  # zfnet, vgg, resnet, cifar
        low, high = config.scale_range or (config.resize_size, config.resize_size)
        rescale = RescaleShorter(low, high, config.interpolation)
    if name == "zfnet":
        crop = FixedCropChoice(config.crop_size, config.resize_size)
    else:
        crop = RandomCrop(config.crop_size, config.padding if name == "cifar" else 0)
    return CropFirst(rescale, crop, normalize, fancy_pca, config.flip)


def eval_preprocess(
    config: DataConfig,
    stats: DatasetStats | None = None,
    *,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> EvalPreprocess:
    """The test-time preprocessing of a data section, normalised with `mean` (and `std` when
    given) if `mean` is given (a trained run's stored normalisation, a model's eval_config),
    else as the section says, from the training set's `stats`."""
    normalize = make_normalize(config, stats) if mean is None else Normalize(mean, std)
    return EvalPreprocess(
        square=config.augmentation == "alexnet",
        crop_size=config.crop_size,
        resize_size=config.resize_size,
        normalize=normalize,
        interpolation=config.interpolation,
        scales=config.multi_scale_test_sizes(),
        center_square=config.augmentation == "zfnet",
    )


class CenterTransform:
    """The single-crop test transform: rescale, centre crop, normalise (EvalPreprocess.center)."""

    def __init__(self, preprocess: EvalPreprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.preprocess.center(image)

    def __repr__(self) -> str:
        return f"CenterTransform(crop_size={self.preprocess.crop_size})"


def center_transform(preprocess: EvalPreprocess) -> CenterTransform:
    return CenterTransform(preprocess)
