"""The papers' training augmentation as small named steps (AlexNet s4.1, ZFNet s3, VGG s3.1,
GoogLeNet s6, ResNet s3.4, CIFAR as He et al. s4.2) and `training_transform`, which builds the
pipeline a DataConfig names. Steps take and return one image tensor C x H x W: geometric ones
(rescales, crops, flips) work on uint8 and float alike, colour ones (`FancyPCA`,
`Photometric`) need float (canon.data.normalize.ToFloat). Randomness comes from torch's
global generator, which DataLoader seeds per worker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from canon.data.config import PCA_SCALES, DataConfig
from canon.data.geometry import (
    check_crop,
    crop_box,
    cut,
    fit_image,
    five_crop_boxes,
    overlap,
    resample_window,
    resize_image,
    shorter_side_size,
)
from canon.data.normalize import Normalize, ToFloat, make_normalize
from canon.data.preprocess import CenterTransform, center_transform, eval_preprocess
from canon.data.stats import DatasetStats, imagenet_pca
from canon.errors import ConfigError

# GoogLeNet s6: "random interpolation methods (bilinear, area, nearest neighbor and cubic, with
# equal probability) for resizing"; "area" as geometry.resize_image computes it.
INTERPOLATION_JITTER = ("bilinear", "area", "nearest", "bicubic")


class RescaleSquare:
    """A size x size square: by default the central square of the image rescaled to shorter
    side `size` (AlexNet s2: "rescaled the image such that the shorter side was of length 256,
    and then cropped out the central 256x256 patch"; ZFNet s3 alike), or with
    fit="squash" the whole image rescaled to size x size (DataConfig.alexnet_resize)."""

    def __init__(
        self, size: int, fit: str = "center-square", interpolation: str = "bilinear"
    ) -> None:
        self.size, self.fit, self.interpolation = size, fit, interpolation

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return fit_image(image, self.size, self.fit, self.interpolation)

    def target_size(self, height: int, width: int,
                    generator: torch.Generator | None = None) -> tuple[int, int]:
        return self.size, self.size

    def window(self, image: torch.Tensor, height: int, width: int,
               inside: tuple[int, int, int, int]) -> torch.Tensor:
        """The float window `inside` of the rescaled image."""
        return ToFloat()(cut(self(image), inside))

    def __repr__(self) -> str:
        return f"RescaleSquare({self.size}, {self.fit})"


class RescaleShorter:
    """Isotropic rescale of the shorter side to S: fixed, or uniform in [low, high] per image
    (VGG s3.1 scale jittering, ResNet s3.4 scale augmentation)."""

    def __init__(self, low: int, high: int | None = None, interpolation: str = "bilinear") -> None:
        self.low, self.high, self.interpolation = low, high or low, interpolation

    def shorter_side(self, generator: torch.Generator | None = None) -> int:
        """This image's S, drawn from `generator` (default: torch's global one)."""
        if self.high == self.low:
            return self.low
        return int(torch.randint(self.low, self.high + 1, (), generator=generator))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return resize_image(image, *self.target_size(*image.shape[-2:]), self.interpolation)

    def target_size(self, height: int, width: int,
                    generator: torch.Generator | None = None) -> tuple[int, int]:
        """A height x width image's size rescaled, S drawn from `generator` (default: torch's
        global one)."""
        return shorter_side_size(height, width, self.shorter_side(generator))

    def window(self, image: torch.Tensor, height: int, width: int,
               inside: tuple[int, int, int, int]) -> torch.Tensor:
        """The float window `inside` of `image` rescaled to height x width. Bilinear
        resamples only the window, in float (resample_window: the same filter, without
        rounding the rescaled image to uint8): scale jitter enlarges Imagenette's images up
        to 3 times, and a 224 crop is then as little as a fifth of them."""
        if self.interpolation == "bilinear" and tuple(image.shape[-2:]) != (height, width):
            return resample_window(ToFloat()(image), height, width, inside)
        return ToFloat()(cut(resize_image(image, height, width, self.interpolation), inside))

    def __repr__(self) -> str:
        scale = self.low if self.high == self.low else (self.low, self.high)
        return f"RescaleShorter({scale})"


class RandomCrop:
    """A random size x size window of the image zero-padded by `padding` pixels (CIFAR: 4)."""

    def __init__(self, size: int, padding: int = 0) -> None:
        self.size, self.padding = size, padding

    def box(self, height: int, width: int, generator: torch.Generator | None = None
            ) -> tuple[int, int]:
        """(top, left) in the unpadded image's coordinates, so from -padding on, drawn from
        `generator` (default: torch's global one)."""
        check_crop(height + 2 * self.padding, width + 2 * self.padding, self.size)
        top = int(torch.randint(0, height + 2 * self.padding - self.size + 1, (),
                                generator=generator))
        left = int(torch.randint(0, width + 2 * self.padding - self.size + 1, (),
                                 generator=generator))
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
    image (the central square, RescaleSquare), uniformly per image; with RandomFlip, one of
    the ten "sub-crops of size 224x224 (corners + center with(out) horizontal flips)"."""

    def __init__(self, size: int) -> None:
        self.size = size

    def box(self, height: int, width: int) -> tuple[int, int]:
        boxes = five_crop_boxes(height, width, self.size)
        return boxes[int(torch.randint(0, 5, ()).item())]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return crop_box(image, *self.box(*image.shape[-2:]), self.size)

    def __repr__(self) -> str:
        return f"FixedCropChoice({self.size})"


class RandomFlip:
    """Horizontal reflection with probability 1/2 (every paper)."""

    @staticmethod
    def draw(generator: torch.Generator | None = None) -> bool:
        """Whether to reflect, drawn from `generator` (default: torch's global one)."""
        return bool(torch.rand((), generator=generator) < 0.5)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.flip(-1) if self.draw() else image

    def __repr__(self) -> str:
        return "RandomFlip()"


class RandomAreaCrop:
    """GoogLeNet s6: a crop of area fraction in `area_range` and aspect ratio in
    `aspect_range` (log-uniform), resized to size x size with one of `interpolations` drawn
    uniformly per image (INTERPOLATION_JITTER: s6's random interpolation methods, which the
    paper adopted "relatively late" and "could not tell definitely" helped); after 10 failed
    draws, the largest centred crop with a ratio in range."""

    def __init__(
        self,
        size: int,
        area_range: tuple[float, float] = (0.08, 1.0),
        aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
        interpolations: Sequence[str] = ("bilinear",),
    ) -> None:
        self.size, self.area_range, self.aspect_range = size, area_range, aspect_range
        self.interpolations = tuple(interpolations)

    def interpolation(self) -> str:
        """This image's resampling filter; a single one costs no random draw."""
        if len(self.interpolations) == 1:
            return self.interpolations[0]
        return self.interpolations[int(torch.randint(0, len(self.interpolations), ()).item())]

    def box(self, height: int, width: int, generator: torch.Generator | None = None
            ) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width), drawn from `generator` (default: torch's
        global one)."""
        log_low, log_high = (math.log(r) for r in self.aspect_range)
        for _ in range(10):
            area = height * width * float(
                torch.empty(()).uniform_(*self.area_range, generator=generator))
            ratio = math.exp(float(torch.empty(()).uniform_(log_low, log_high,
                                                            generator=generator)))
            crop_w = round(math.sqrt(area * ratio))
            crop_h = round(math.sqrt(area / ratio))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
                left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
                return top, left, crop_h, crop_w
        ratio = min(max(width / height, self.aspect_range[0]), self.aspect_range[1])
        crop_w = min(width, round(height * ratio))
        crop_h = min(height, round(crop_w / ratio))
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.resized(image, self.box(*image.shape[-2:]), self.interpolation())

    def resized(self, image: torch.Tensor, box: tuple[int, int, int, int],
                interpolation: str) -> torch.Tensor:
        """The crop `box` (top, left, height, width) of `image`, resized to size x size."""
        top, left, crop_h, crop_w = box
        patch = image[..., top : top + crop_h, left : left + crop_w]
        return resize_image(patch, self.size, self.size, interpolation)

    def __repr__(self) -> str:
        return (f"RandomAreaCrop({self.size}, area={self.area_range}, "
                f"aspect={self.aspect_range}, interpolations={self.interpolations})")


class FancyPCA:
    """AlexNet s4.1: add sum_i alpha_i * lambda_i * p_i to every pixel, alpha_i ~ N(0, std^2)
    drawn once per call (once per image per epoch); p_i are the columns of `eigvec`.

    lambda_i are the RGB covariance eigenvalues of pixels in [0, 1]: the paper does not give
    units, and in 0-255 units the shift would exceed the pixel range. ImageNet's published
    constants (stats.IMAGENET_PCA_EIGVAL) are in the same units and are applied the same way,
    as fb.resnet.torch does. `scale="stdev"` multiplies alpha_i by sqrt(lambda_i) instead, as
    Krizhevsky's cuda-convnet2 does (data.pca_scale)."""

    def __init__(self, eigvec: torch.Tensor, eigval: torch.Tensor, alpha_std: float,
                 scale: str = "eigenvalue") -> None:
        self.eigvec, self.eigval, self.alpha_std = eigvec.float(), eigval.float(), alpha_std
        if scale not in PCA_SCALES:
            raise ConfigError(f"FancyPCA: scale must be one of {', '.join(PCA_SCALES)}, got "
                              f"{scale!r}")
        self.scale = scale
        # What alpha multiplies, per component.
        self.magnitudes = self.eigval if scale == "eigenvalue" else self.eigval.clamp(min=0).sqrt()

    def alpha(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """alpha (3,) ~ N(0, alpha_std^2) for one image, drawn from `generator` (default:
        torch's global one)."""
        return torch.randn(3, generator=generator) * self.alpha_std

    def noise(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The RGB shift for one image (3,), of alpha drawn from `generator`."""
        return self.shift(self.alpha(generator))

    def shift(self, alpha: torch.Tensor) -> torch.Tensor:
        """The RGB shifts (..., 3) of alpha (..., 3) ~ N(0, alpha_std^2)."""
        return (alpha * self.magnitudes.to(alpha.device)) @ self.eigvec.to(alpha.device).T

    def to(self, device: torch.device) -> FancyPCA:
        """The same colour shift with its basis on `device`, for batched augmentation to keep
        (a copy from host memory each batch would wait for the GPU's queue)."""
        return FancyPCA(self.eigvec.to(device), self.eigval.to(device), self.alpha_std,
                        self.scale)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image + self.noise().view(3, 1, 1)

    def __repr__(self) -> str:
        return f"FancyPCA(alpha_std={self.alpha_std}, scale={self.scale!r})"


_LUMA_WEIGHTS = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)  # ITU-R BT.601 greyscale


class Photometric:
    """Random brightness, contrast and saturation factors in [max(0, 1 - s), 1 + s], random
    order: GoogLeNet s6's "photometric distortions" (after Howard 2013), which the paper does
    not specify; this is canon's reading of them. Factors stop at 0, as torchvision's
    ColorJitter's do: a negative one would blacken or invert the image."""

    def __init__(self, strength: float) -> None:
        self.strength = strength

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        for which in torch.randperm(3).tolist():
            factor = float(torch.empty(()).uniform_(max(0.0, 1 - self.strength),
                                                    1 + self.strength))
            if which == 0:
                image = image * factor
            else:
                grey = (image * _LUMA_WEIGHTS.to(image)).sum(0)
                if which == 1:
                    grey = grey.mean()
                image = (image - grey) * factor + grey
            image = image.clamp(0, 1)  # after each, as an image editor (and torchvision) would
        return image

    def __repr__(self) -> str:
        return f"Photometric({self.strength})"


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
    """Draw the rescaled size, the colour shift, then the crop box; take the crop of the
    rescaled image as float (RescaleShorter resamples only the crop; RescaleSquare cuts it
    from the uint8 square); shift, subtract the mean image at the crop's box, zero-pad where
    the crop overhangs (CIFAR), reflect (the alexnet, zfnet, vgg, resnet and cifar pipelines).

    That equals normalising the whole rescaled image and cropping it afterwards, with the same
    random draws in the same order: the order the papers describe (the zero padding of the
    CIFAR crop is the mean colour, He et al. s4.2; AlexNet's 224 crops come from a
    mean-subtracted 256 x 256 image, Krizhevsky et al. s2), with the float work done on the
    crop alone (bench/bench_pipelines.py)."""

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
        height, width = self.rescale.target_size(*image.shape[-2:])
        shift = self.fancy_pca.noise().view(3, 1, 1) if self.fancy_pca is not None else None
        inside, padding = overlap(*self.crop.box(height, width), self.crop.size, height, width)
        window = self.rescale.window(image, height, width, inside)
        if shift is not None:
            window = window + shift
        window = self.normalize(window, (height, width, inside[0], inside[1]))
        if any(padding):
            window = F.pad(window, padding)
        return self.flip(window) if self.flip is not None else window

    def __repr__(self) -> str:
        steps = [self.rescale, self.crop, self.fancy_pca, self.normalize, self.flip]
        return "CropFirst(" + ", ".join(repr(s) for s in steps if s is not None) + ")"


class AreaCropFirst:
    """GoogLeNet s6's pipeline: draw the crop box and resampling filter (RandomAreaCrop), cut
    and resize the crop, apply the photometric distortions and the colour shift, subtract the
    mean image's window under the crop resized alike (a channel mean as it is), divide by the
    std when asked, reflect.

    The mean is aligned with the crop as CropFirst's is: an 8% crop of the top-left corner
    gets the top-left of the mean image, as evaluation's centre crop gets its centre."""

    def __init__(
        self,
        crop: RandomAreaCrop,
        normalize: Normalize,
        photometric: Photometric | None = None,
        fancy_pca: FancyPCA | None = None,
        flip: bool = True,
    ) -> None:
        self.crop, self.normalize = crop, normalize
        self.photometric, self.fancy_pca = photometric, fancy_pca
        self.flip = RandomFlip() if flip else None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        box = self.crop.box(height, width)
        interpolation = self.crop.interpolation()
        patch = ToFloat()(self.crop.resized(image, box, interpolation))
        if self.photometric is not None:
            patch = self.photometric(patch)
        if self.fancy_pca is not None:
            patch = self.fancy_pca(patch)
        mean = self.normalize.mean_at(height, width, box)
        if mean.shape[-2:] != (1, 1):  # a channel mean broadcasts: resizing it changes nothing
            mean = resize_image(mean, self.crop.size, self.crop.size, interpolation)
        patch = patch - mean
        if self.normalize.std is not None:
            patch = patch / self.normalize.std
        return self.flip(patch) if self.flip is not None else patch

    def __repr__(self) -> str:
        steps = [self.crop, self.photometric, self.fancy_pca, self.normalize, self.flip]
        return "AreaCropFirst(" + ", ".join(repr(s) for s in steps if s is not None) + ")"


def make_fancy_pca(config: DataConfig, stats: DatasetStats | None) -> FancyPCA:
    if config.pca_source == "imagenet":
        eigval, eigvec = imagenet_pca()
        return FancyPCA(eigvec, eigval, config.pca_std, config.pca_scale)
    if stats is None:
        raise ConfigError("data.pca_source='dataset' needs the training set's statistics")
    return FancyPCA(stats.pca_eigvec, stats.pca_eigval, config.pca_std, config.pca_scale)


def training_transform(
    config: DataConfig, stats: DatasetStats | None
) -> CropFirst | AreaCropFirst | CenterTransform:
    """The named paper pipeline (DataConfig.augmentation) for training images."""
    name = config.augmentation
    if name == "none":
        return center_transform(eval_preprocess(config, stats))
    normalize = make_normalize(config, stats)
    fancy_pca = make_fancy_pca(config, stats) if config.pca_std > 0 else None
    if name == "googlenet":
        jitter = INTERPOLATION_JITTER if config.interpolation_jitter else ()
        crop = RandomAreaCrop(config.crop_size, config.area_range, config.aspect_range,
                              jitter or (config.interpolation,))
        photometric = Photometric(config.photometric) if config.photometric > 0 else None
        return AreaCropFirst(crop, normalize, photometric, fancy_pca, config.flip)
    if name in ("alexnet", "zfnet"):  # crops of the central square (or the squashed image)
        rescale = RescaleSquare(config.resize_size, config.image_fit(), config.interpolation)
    else:  # vgg, resnet, cifar
        low, high = config.scale_range or (config.resize_size, config.resize_size)
        rescale = RescaleShorter(low, high, config.interpolation)
    if name == "zfnet":
        crop = FixedCropChoice(config.crop_size)
    else:
        crop = RandomCrop(config.crop_size, config.padding if name == "cifar" else 0)
    return CropFirst(rescale, crop, normalize, fancy_pca, config.flip)
