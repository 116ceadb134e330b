"""Evaluation preprocessing: the test-time rescale, crop and normalisation every view shares
(AlexNet s2 and s4.1, ZFNet s3, VGG s3.2, GoogLeNet s7, ResNet s3.4), and the single
centre-crop transform used for validation during training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from canon.data.config import DataConfig
from canon.data.geometry import center_box, crop_box, fit_image
from canon.data.normalize import Normalize, ToFloat, make_normalize
from canon.data.stats import DatasetStats


@dataclass
class EvalPreprocess:
    """Test-time preprocessing shared by every view: rescale, then to float and normalise.

    `fit` (DataConfig.image_fit): the shorter side rescaled isotropically, the whole image
    kept; or then its central square (AlexNet s2, ZFNet s3), whose corners and centre the
    ten test crops take; or squashed to a square (DataConfig.alexnet_resize="squash")."""

    crop_size: int
    resize_size: int
    normalize: Normalize
    interpolation: str = "bilinear"
    # Shorter sides for multi-scale protocols (DataConfig.multi_scale_test_sizes), and whether
    # the recipe named them (data.test_scales) rather than took VGG's rule.
    scales: tuple[int, ...] = ()
    fit: str = "shorter"
    scales_named: bool = False

    def rescale(self, image: torch.Tensor, size: int | None = None) -> torch.Tensor:
        return fit_image(image, size or self.resize_size, self.fit, self.interpolation)

    def __call__(self, image: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """The rescaled, normalised float image (before any crop)."""
        return self.normalize(ToFloat()(self.rescale(image, size)))

    def center_crop(
        self, image: torch.Tensor, size: int | None = None
    ) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """The uint8 centre crop_size crop of the image rescaled to `size` (what the network
        sees), and where it lies: (height, width) of the rescaled image, (top, left)."""
        image = self.rescale(image, size)
        height, width = image.shape[-2:]
        top, left = center_box(height, width, self.crop_size)
        return crop_box(image, top, left, self.crop_size), (height, width, top, left)

    def center(self, image: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """The normalised centre crop_size crop of the image rescaled to `size`; equals
        cropping self(image, size), with the float work done on the crop alone."""
        window, placement = self.center_crop(image, size)
        return self.normalize(ToFloat()(window), placement)


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
        crop_size=config.crop_size,
        resize_size=config.resize_size,
        normalize=normalize,
        interpolation=config.interpolation,
        scales=config.multi_scale_test_sizes(),
        fit=config.image_fit(),
        scales_named=bool(config.test_scales),
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
