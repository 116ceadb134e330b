"""The CIFAR-10 networks of the ResNet paper, ResNet-20 .. ResNet-1202 and their plain
counterparts (He et al., "Deep Residual Learning for Image Recognition", 2015, section 4.2,
Table 6, Fig. 6).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from canon.errors import ConfigError
from canon.models.base import EvalConfig, register_model
from canon.models.resnet import BasicBlock, ResNet

# Channel statistics of the 50,000 CIFAR-10 training images (pixels scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

CIFAR_WIDTHS = (16, 32, 64)


class CifarResNet(ResNet):
    """ResNet of depth 6n + 2 for 32x32 images (section 4.2).

    A 3x3 convolution of 16 filters, then three stages of n basic blocks each (2n 3x3 layers on
    32x32, 16x16 and 8x8 maps with 16, 32 and 64 filters), global average pooling and a fully
    connected layer: 6n + 2 weight layers. Subsampling is a stride-2 convolution in the first
    block of the second and third stage. Shortcuts are identities everywhere, with option A
    where the dimensions grow (subsample by 2, pad the new channels with zeros), so shortcuts add
    no parameters. `shortcut=None` (`plainN`) gives the same layers without shortcuts.

    Deviations:

    - The paper subtracts the per-pixel mean image; `eval_config` normalises by the per-channel
      mean and standard deviation of the CIFAR-10 training set instead, the convention the data
      pipeline shares with every other model.
    - Initialisation: He et al. normal init scaled by fan-out (the paper cites [13] without a
      fan mode); BN gamma 1, beta 0; the fc layer keeps PyTorch's default.
    - Stages are named like the ImageNet nets (conv1, conv2_x, conv3_x, conv4_x); the paper
      gives them no names.
    - Any input of at least 4x4 is accepted (the total stride: every stride-2 stage then still
      halves its input, ending at 1x1); the paper uses 32x32.
    """

    eval_config = EvalConfig(input_size=32, resize_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    min_input_size = 4

    def __init__(
        self, depth: int, num_classes: int = 10, shortcut: str | None = "A", **kwargs: Any
    ) -> None:
        blocks_per_stage, remainder = divmod(depth - 2, 6)
        if remainder or blocks_per_stage < 1:
            raise ConfigError(f"CIFAR ResNets have 6n + 2 layers (20, 32, 44, ...), got {depth}")
        stem = nn.Sequential(
            nn.Conv2d(3, CIFAR_WIDTHS[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(CIFAR_WIDTHS[0]),
            nn.ReLU(inplace=True),
        )
        # conv1   N x 16 x 32 x 32
        # conv2_x N x 16 x 32 x 32, conv3_x N x 32 x 16 x 16, conv4_x N x 64 x 8 x 8
        super().__init__(
            BasicBlock,
            (blocks_per_stage,) * 3,
            num_classes,
            widths=CIFAR_WIDTHS,
            stem=stem,
            stem_channels=CIFAR_WIDTHS[0],
            shortcut=shortcut,
            **kwargs,
        )


@register_model()
def resnet20(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (He et al. 2015, section 4.2), 0.27M params, option A shortcuts."""
    return CifarResNet(20, num_classes, **kwargs)


@register_model()
def resnet32(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (He et al. 2015, section 4.2), 0.46M params, option A shortcuts."""
    return CifarResNet(32, num_classes, **kwargs)


@register_model()
def resnet44(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-44 for CIFAR (He et al. 2015, section 4.2), 0.66M params, option A shortcuts."""
    return CifarResNet(44, num_classes, **kwargs)


@register_model()
def resnet56(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR (He et al. 2015, section 4.2), 0.85M params, option A shortcuts."""
    return CifarResNet(56, num_classes, **kwargs)


@register_model()
def resnet110(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-110 for CIFAR (He et al. 2015, section 4.2), 1.7M params, option A shortcuts."""
    return CifarResNet(110, num_classes, **kwargs)


@register_model()
def resnet1202(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-1202 for CIFAR (He et al. 2015, section 4.2), 19.4M params, overfits per paper."""
    return CifarResNet(1202, num_classes, **kwargs)


@register_model()
def plain20(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """Plain-20 for CIFAR (He et al. 2015, Fig. 6 left): ResNet-20 without shortcuts."""
    return CifarResNet(20, num_classes, shortcut=None, **kwargs)


@register_model()
def plain32(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """Plain-32 for CIFAR (He et al. 2015, Fig. 6 left): ResNet-32 without shortcuts."""
    return CifarResNet(32, num_classes, shortcut=None, **kwargs)


@register_model()
def plain44(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """Plain-44 for CIFAR (He et al. 2015, Fig. 6 left): ResNet-44 without shortcuts."""
    return CifarResNet(44, num_classes, shortcut=None, **kwargs)


@register_model()
def plain56(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """Plain-56 for CIFAR (He et al. 2015, Fig. 6 left): ResNet-56 without shortcuts."""
    return CifarResNet(56, num_classes, shortcut=None, **kwargs)


@register_model()
def plain110(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """Plain-110 for CIFAR (He et al. 2015, Fig. 6 left): ResNet-110 without shortcuts."""
    return CifarResNet(110, num_classes, shortcut=None, **kwargs)
