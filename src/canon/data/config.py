"""The `data:` section of a recipe: which dataset, and which paper's preprocessing. Every field
has a default that reproduces the bundled-sample CIFAR setting of He et al. (2015), s4.2, so
`DataConfig()` is a working configuration; values are validated when the object is built, and
a bad one raises ConfigError naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from canon.errors import ConfigError
from canon.validation import build_dataclass

AUGMENTATIONS = ("alexnet", "zfnet", "vgg", "resnet", "googlenet", "cifar", "none")
MEANS = ("pixel", "channel", "imagenet", "inception")
PCA_SOURCES = ("dataset", "imagenet")
PCA_SCALES = ("eigenvalue", "stdev")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")
ALEXNET_RESIZES = ("center-square", "squash")
# PIL's decompression-bomb threshold, 2 x PIL.Image.MAX_IMAGE_PIXELS: PIL refuses larger images.
MAX_IMAGE_PIXELS = 178_956_970


@dataclass(frozen=True)
class DataConfig:
    # "sample" (bundled), "cifar10", "cifar100", or a folder: ImageNet layout (train/, val/),
    # or one holding cifar-10-batches-py / cifar-100-python.
    dataset: str = "sample"
    # Named paper pipeline (canon.data.transforms.training_transform): alexnet (Krizhevsky et
    # al. 2012, s4.1), zfnet (Zeiler & Fergus 2013, s3: shorter side to resize_size, its centre
    # square, one of its ten corner/centre crops with(out) flip), vgg (Simonyan & Zisserman
    # 2014, s3.1), resnet (He et al. 2015, s3.4), googlenet (Szegedy et al. 2014, s6), cifar
    # (He et al. 2015, s4.2), none (resize + centre crop only).
    augmentation: str = "cifar"
    # Side of the square training crop: 224 in the ImageNet papers, 32 for CIFAR.
    crop_size: int = 32
    # Evaluation: shorter side before the centre crop (256 for VGG/ResNet/GoogLeNet). AlexNet
    # (s2) and ZFNet (s3) then keep the central resize_size square, for training and testing
    # alike (image_fit). Also the side of the mean image (canon.data.stats.mean_image_fit).
    resize_size: int = 32
    # AlexNet s2: "we first rescaled the image such that the shorter side was of length 256,
    # and then cropped out the central 256x256 patch" ("center-square"); "squash" rescales the
    # whole image to resize_size x resize_size, ignoring its aspect ratio (canon's earlier
    # reading, kept by name). Read by the alexnet pipeline only.
    alexnet_resize: str = "center-square"
    # VGG s3.1 scale jittering / ResNet s3.4 scale augmentation: the shorter side is drawn
    # uniformly from [min, max] per image, e.g. (256, 512) or (256, 480). None: fixed at
    # resize_size (VGG's single-scale training with S = resize_size).
    scale_range: tuple[int, int] | None = None
    # Mean subtraction: "pixel" = the training set's mean image (AlexNet s2, ResNet s3.4/s4.2),
    # "channel" = per-channel mean (VGG s2.1), "imagenet" = torchvision's published constants,
    # "inception" = 0.5 for mean and std (torchvision's pretrained GoogLeNet takes this input).
    mean: str = "pixel"
    # Also divide by the per-channel standard deviation. Off, as in the five papers, which
    # subtract a mean and nothing else (AlexNet s2, ZFNet s3, VGG s2.1, GoogLeNet s5, ResNet
    # s3.4/s4.2); torchvision-style recipes turn it on. With a published mean, its std.
    divide_std: bool = False
    # What the mean is subtracted from: 1, pixels in [0, 1] (torchvision's convention); 255,
    # the papers' 0-255 values, 255 times larger, for which AlexNet's LRN constants and unit
    # biases (s3.3, s5), ZFNet's filter RMS radius (s3) and the N(0, 0.01) initial weights of
    # AlexNet, ZFNet and VGG were chosen. Only without divide_std, which undoes any scale.
    pixel_scale: int = 1
    # A trained model's normalisation, in place of the one mean, divide_std and pixel_scale
    # give: its normalization.safetensors, the run directory or model.safetensors it sits
    # beside, or a training checkpoint (.pt). A fine-tuned network then sees its inputs as its
    # weights were trained on them, not shifted by another training set's mean (canon transfer
    # --mode finetune sets it for a source normalised by its own training set's statistics).
    normalization_from: str | None = None
    # AlexNet s4.1 "fancy PCA" colour augmentation: std of alpha_i (0.1 in the paper); 0 = off.
    # VGG s3.1 and ResNet s3.4 reuse it ("random RGB colour shift", "standard colour
    # augmentation").
    pca_std: float = 0.0
    # Eigenvectors/values for fancy PCA: of this training set, or ImageNet's published ones.
    pca_source: str = "dataset"
    # What alpha_i multiplies: `eigenvalue`, lambda_i of pixels in [0, 1], as s4.1 writes it
    # and fb.resnet.torch applies it; or `stdev`, sqrt(lambda_i), as Krizhevsky's own
    # cuda-convnet2 applies it (a shift that scales with the pixels' units: 2.1, 7.3 and 15
    # times the eigenvalue reading's for ImageNet's three components).
    pca_scale: str = "eigenvalue"
    # CIFAR (He et al. 2015, s4.2): zero padding on each side before the random 32x32 crop.
    padding: int = 4
    # Random horizontal reflection (every paper).
    flip: bool = True
    # GoogLeNet s6: crops covering this range of the image area ...
    area_range: tuple[float, float] = (0.08, 1.0)
    # ... with aspect ratio in this range.
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
    # GoogLeNet s6 photometric distortions (Howard 2013): strength of random brightness,
    # contrast and saturation changes; 0 = off.
    photometric: float = 0.4
    # Resampling filter for every resize ("area": box averaging, see geometry.resize_image).
    interpolation: str = "bilinear"
    # GoogLeNet s6: "random interpolation methods (bilinear, area, nearest neighbor and cubic,
    # with equal probability) for resizing", drawn per training crop by the googlenet
    # pipeline; false: data.interpolation for every crop.
    interpolation_jitter: bool = True
    # Multi-scale test scales (shorter sides); empty = VGG s4.2's rule: {S-32, S, S+32} for a
    # fixed training scale S = resize_size, {min, mid, max} for a jittered scale_range.
    test_scales: tuple[int, ...] = ()
    # Fetch CIFAR from its official address (md5-verified) when it is not on disk.
    download: bool = True
    # Image files with more pixels (width x height, read from the header before decoding) are
    # skipped like undecodable ones: a 1 MB PNG of 30000 x 30000 would decode to 2.7 GB.
    # 0: no limit of canon's own; PIL, which reads the headers, still refuses more than
    # 2 x PIL.Image.MAX_IMAGE_PIXELS (the default here, unless a program raises PIL's limit).
    max_image_pixels: int = MAX_IMAGE_PIXELS
    # Training images held out as the validation set (He et al. s4.2 fixed its CIFAR schedule
    # "on a 45k/5k train/val split"): the training set is the rest, and the dataset's own
    # test/val split is not read. Stratified: each class gives its share. 0: validate on the
    # dataset's test/val split.
    val_split: int = 0
    # Seeds the choice of held-out images; apart from train.seed, so runs with different
    # seeds are validated on the same images.
    val_split_seed: int = 0

    def __post_init__(self) -> None:
        _choice("augmentation", self.augmentation, AUGMENTATIONS)
        _choice("alexnet_resize", self.alexnet_resize, ALEXNET_RESIZES)
        _choice("mean", self.mean, MEANS)
        _choice("pca_source", self.pca_source, PCA_SOURCES)
        _choice("pca_scale", self.pca_scale, PCA_SCALES)
        _choice("interpolation", self.interpolation, INTERPOLATIONS)
        if self.normalization_from is not None and (
                not isinstance(self.normalization_from, str) or not self.normalization_from):
            raise ConfigError("data.normalization_from must be a trained model's file or run "
                              f"directory, or null, got {self.normalization_from!r}")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError(f"data.dataset must be a name or a folder, got {self.dataset!r}")
        for name in ("crop_size", "resize_size"):
            _positive_int(name, getattr(self, name))
        if self.resize_size < self.crop_size:  # the test-time centre crop needs it
            raise ConfigError(
                f"data.resize_size ({self.resize_size}) must be at least data.crop_size "
                f"({self.crop_size})"
            )
        if self.scale_range is not None:
            low, high = _pair("scale_range", self.scale_range, int)
            if not self.crop_size <= low <= high:
                raise ConfigError(
                    f"data.scale_range must satisfy crop_size <= min <= max, got {self.scale_range}"
                )
            object.__setattr__(self, "scale_range", (low, high))
        low, high = _pair("area_range", self.area_range, float)
        if not 0 < low <= high <= 1:
            raise ConfigError(f"data.area_range must lie in (0, 1], got {self.area_range}")
        object.__setattr__(self, "area_range", (low, high))
        low, high = _pair("aspect_range", self.aspect_range, float)
        if not 0 < low <= high:
            raise ConfigError(f"data.aspect_range must be positive and ordered, got {low, high}")
        object.__setattr__(self, "aspect_range", (low, high))
        for name in ("pca_std", "photometric"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not 0 <= value < math.inf):
                raise ConfigError(f"data.{name} must be a finite number >= 0, got {value!r}")
        for name in ("padding", "max_image_pixels", "val_split", "val_split_seed"):
            _non_negative_int(name, getattr(self, name))
        scales = tuple(self.test_scales)
        for scale in scales:
            _positive_int("test_scales", scale)
        object.__setattr__(self, "test_scales", scales)
        for name in ("divide_std", "flip", "download", "interpolation_jitter"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"data.{name} must be true or false, got {getattr(self, name)!r}")
        if self.pixel_scale not in (1, 255) or isinstance(self.pixel_scale, bool):
            raise ConfigError(f"data.pixel_scale must be 1 or 255, got {self.pixel_scale!r}")
        if self.pixel_scale != 1 and self.divide_std:
            raise ConfigError("data.pixel_scale 255 scales mean-subtracted pixels, which "
                              "divide_std would scale back: set one of them (with "
                              "data.divide_std true, also set data.pixel_scale 1)")

    @classmethod
    def from_dict(cls, values: dict) -> DataConfig:
        """Build from a recipe's `data:` mapping; unknown keys are an error listing valid ones."""
        return build_dataclass(cls, values, "data")

    def image_fit(self) -> str:
        """How images are rescaled before any crop (canon.data.geometry.fit_image): to the
        central resize_size square (AlexNet s2, ZFNet s3), squashed (alexnet_resize), or with
        the shorter side to the scale, the whole image kept (the others)."""
        if self.augmentation == "alexnet":
            return self.alexnet_resize
        return "center-square" if self.augmentation == "zfnet" else "shorter"

    def multi_scale_test_sizes(self) -> tuple[int, ...]:
        """Shorter sides for multi-scale testing (VGG s4.2's Q when none are given)."""
        if self.test_scales:
            return self.test_scales
        if self.scale_range is not None:
            low, high = self.scale_range
            return (low, (low + high) // 2, high)
        size = self.resize_size
        return tuple(s for s in (size - 32, size, size + 32) if s >= self.crop_size)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"data.{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"data.{name} must be a positive integer, got {value!r}")


def _non_negative_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"data.{name} must be an integer >= 0, got {value!r}")


def _pair(name: str, value: object, kind: type) -> tuple:
    try:
        low, high = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ConfigError(f"data.{name} must be a pair [min, max], got {value!r}") from None
    if kind is int and not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
        raise ConfigError(f"data.{name} must hold integers, got {value!r}")
    if kind is float and not all(isinstance(v, int | float) and math.isfinite(v)
                                 for v in (low, high)):
        raise ConfigError(f"data.{name} must hold finite numbers, got {value!r}")
    if low > high:
        raise ConfigError(f"data.{name} must be ordered [min, max], got {value!r}")
    return kind(low), kind(high)
