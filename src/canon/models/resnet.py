"""ImageNet ResNets and their plain counterparts (He et al., "Deep Residual Learning for Image
Recognition", 2015, Table 1 and sections 3.3-3.4), plus torchvision's "v1.5" bottleneck variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from canon.errors import ConfigError
from canon.models.base import register_model
from canon.models.init import kaiming_normal_
from canon.models.layers import PooledHeadNet

# Blocks per stage conv2_x .. conv5_x (Table 1).
DEPTHS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
# Stage outputs at 224x224 (e = block expansion: 1 for 18/34 layers, 4 for 50/101/152):
# conv1   N x 64 x 56 x 56     (7x7/2 convolution, then the 3x3/2 max pool)
# conv2_x N x 64e x 56 x 56
# conv3_x N x 128e x 28 x 28
# conv4_x N x 256e x 14 x 14
# conv5_x N x 512e x 7 x 7     then global average pool and fc
IMAGENET_WIDTHS = (64, 128, 256, 512)
SHORTCUT_OPTIONS = ("A", "B", "C", None)
STEMS = ("7x7", "deep")


class ZeroPadShortcut(nn.Module):
    """Option A: identity, subsampled by `stride`, with the extra channels filled with zeros."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


def make_shortcut(
    option: str | None, in_channels: int, out_channels: int, stride: int, avg_down: bool = False
) -> nn.Module | None:
    """The shortcut of one block: None for a plain block, else a module added to its output.

    `option` is one of Table 3's: where the dimensions change, "A" subsamples and zero-pads the
    new channels and "B" projects, both being the identity elsewhere; "C" projects everywhere. A
    projection is a strided 1x1 convolution followed by batch norm; with `avg_down` a strided
    one averages each 2x2 window and then convolves with stride 1, instead of reading one pixel
    in four (He et al. 2019, "Bag of Tricks", ResNet-D; timm's `avg_down`).
    """
    if option not in SHORTCUT_OPTIONS:
        raise ConfigError(f"shortcut must be one of 'A', 'B', 'C' or None, got {option!r}")
    if avg_down and option in ("A", None):
        raise ConfigError(f"avg_down averages before a projection shortcut (option B or C); "
                          f"shortcut={option!r} has none")
    if option is None:
        return None
    changes_shape = stride != 1 or in_channels != out_channels
    if option == "A" and changes_shape:
        if out_channels < in_channels:
            raise ConfigError(
                f"option A shortcuts pad channels with zeros and cannot go from {in_channels} "
                f"to {out_channels} channels; use shortcut='B'"
            )
        return ZeroPadShortcut(in_channels, out_channels, stride)
    if option == "C" or (option == "B" and changes_shape):
        if avg_down and stride != 1:
            return nn.Sequential(
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    return nn.Identity()


class ResidualBlock(nn.Module):
    """relu(residual(x) + shortcut(x)); a plain block (shortcut None) is relu(residual(x))."""

    expansion: int
    shortcut: nn.Module | None

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        raise NotImplementedError

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Summed and rectified in place, as torchvision's blocks are: `out` is a BN output,
        # which no backward needs, and each new tensor is an allocation per block and step.
        out = self.residual(x)
        if self.shortcut is not None:
            out += self.shortcut(x)
        return F.relu(out, inplace=True)


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions (Fig. 5 left); the first one carries the stride."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        shortcut: str | None = "B",
        avg_down: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = make_shortcut(shortcut, in_channels, channels, stride, avg_down)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return self.bn2(self.conv2(x))


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand to 4x `channels` (Fig. 5 right).

    The paper (and its Caffe models) stride the first 1x1 convolution; `stride_in_1x1=False`
    strides the 3x3 instead, as torchvision (and NVIDIA's "ResNet v1.5") do: it costs more
    FLOPs (4.09 vs 3.8 GFLOPs for the 50-layer net) and gains ~0.5% top-1. Parameter counts do
    not change.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        shortcut: str | None = "B",
        stride_in_1x1: bool = True,
        avg_down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, channels, 1, stride=stride_1x1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride_3x3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride, avg_down)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        return self.bn3(self.conv3(x))


def conv_bn_relu_layers(in_channels: int, out_channels: int, kernel_size: int,
                        stride: int = 1) -> list[nn.Module]:
    """Convolution, BN, ReLU as loose layers (not googlenet's named conv_bn_relu block): the
    stem is one flat Sequential, whose conv1.0 and conv1.1 torchvision's conv1 and bn1 map to."""
    return [nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                      padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def imagenet_stem(kind: str = "7x7") -> nn.Sequential:
    """conv1 of Table 1 ("7x7": a 7x7/2 convolution of 64 filters, BN, ReLU) and its 3x3/2 max pool.

    "deep" puts three 3x3 convolutions (32, 32 and 64 filters, the first strided) in place of
    the 7x7: VGG's argument (Simonyan & Zisserman 2014, s2.3) that such a stack sees as far as
    one 7x7 with three rectifications in place of one, as Inception-v3 and "Bag of Tricks"
    (ResNet-C) later did in ResNets; timm's `stem_type="deep"`.
    """
    if kind not in STEMS:
        raise ConfigError(f"stem must be one of {', '.join(map(repr, STEMS))}, got {kind!r}")
    layers = (conv_bn_relu_layers(3, 64, 7, stride=2) if kind == "7x7" else
              [*conv_bn_relu_layers(3, 32, 3, stride=2), *conv_bn_relu_layers(32, 32, 3),
               *conv_bn_relu_layers(32, 64, 3)])
    return nn.Sequential(*layers, nn.MaxPool2d(3, stride=2, padding=1))


class ResNet(PooledHeadNet):
    """A stem, stages conv2_x.. of residual (or plain) blocks, global average pool, fc.

    The first stage keeps the stem's resolution; each later one halves it in its first block.
    `block_kwargs` go to every block (`shortcut`, and `stride_in_1x1` for bottlenecks).

    `resnet18` .. `resnet152` are the paper's networks: batch norm right after every
    convolution and before the activation, projection shortcuts (1x1 convolution + BN) only
    where the dimensions change (option B), identity elsewhere, and in bottleneck blocks the
    stride 2 of a downsampling block sits in the first 1x1 convolution, as in the released Caffe
    models. `plain18`, `plain34` are the same layers without shortcuts (`shortcut=None`;
    section 3.3, "Plain Network").

    Deviations and variants:

    - The projection shortcut is a strided 1x1 convolution followed by batch norm; the paper's
      text says only "1x1 convolutions", the BN is in its released Caffe models and
      torchvision's.
    - Shortcut options A (zero-padding) and C (all projections) of Table 3 are available
      through the `shortcut` argument ("A", "B", "C"). The registered names use B, the
      paper's choice for its bottleneck nets (section 4.1); for ResNet-18 and -34 it is
      torchvision's: the paper's Table 2 and Fig. 4 nets use option A (`shortcut="A"`, as
      plain-18's parameter count, 11,515,688 at 1000 classes for ResNet-18), and ResNet-34
      appears with B only in Tables 3 and 4.
    - `resnet50_v1_5`, `resnet101_v1_5`, `resnet152_v1_5` stride the bottleneck's 3x3
      convolution instead of its first 1x1, as torchvision does (see `Bottleneck`).
    - `stem="deep"` and `avg_down=True` are later variants, not the paper's (see
      `imagenet_stem` and `make_shortcut`); with both, a net is timm's "d" variant (resnet34d).
    - Table 1 lists the 3x3/2 max pool at the head of conv2_x; here it closes the `conv1` stage,
      so that every `convN_x` stage is made of residual blocks only.
    - Initialisation: He et al. 2015 ("Delving deep into rectifiers") normal init for
      convolutions, scaled by fan-out as torchvision does (the paper cites the method, not the
      fan mode); BN gamma 1, beta 0; the fc layer keeps PyTorch's default.
      `zero_init_residual=True` starts every block's last BN gamma at zero (Goyal et al. 2017),
      which the paper does not do.
    - The head is a global average pool (Table 1's "average pool") of any size, so the networks
      accept any input of at least 32x32 (the total stride; the last stage is then 1x1).
    """

    def __init__(
        self,
        block: type[ResidualBlock],
        depths: Sequence[int],
        num_classes: int = 1000,
        *,
        widths: Sequence[int] = IMAGENET_WIDTHS,
        stem: nn.Module | str = "7x7",
        stem_channels: int = 64,
        zero_init_residual: bool = False,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.add_stage("conv1", imagenet_stem(stem) if isinstance(stem, str) else stem)
        in_channels = stem_channels
        for index, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(depth):
                blocks.append(block(in_channels, width, stride if block_index == 0 else 1,
                                    **block_kwargs))
                in_channels = width * block.expansion
            self.add_stage(f"conv{index + 2}_x", nn.Sequential(*blocks))
        self.add_classifier(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                kaiming_normal_(module)
        if zero_init_residual:
            self.zero_init_residual_()

    def blocks(self) -> list[ResidualBlock]:
        return [m for m in self.modules() if isinstance(m, ResidualBlock)]

    def zero_init_residual_(self) -> None:
        """Zero every block's last BN gamma, so each residual block starts as the identity."""
        blocks = self.blocks()
        if any(b.shortcut is None for b in blocks):
            raise ConfigError(
                "zero_init_residual needs shortcuts: a plain network would start with every "
                "block outputting zeros"
            )
        for b in blocks:
            nn.init.zeros_(b.last_bn.weight)

    def init_classifier(self, layer: nn.Linear) -> None:
        layer.reset_parameters()  # PyTorch's default, as the fc at construction


def _resnet(depth: int, num_classes: int, **kwargs: Any) -> ResNet:
    block = BasicBlock if depth < 50 else Bottleneck
    return ResNet(block, DEPTHS[depth], num_classes, **kwargs)


@register_model()
def resnet18(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-18 (He et al. 2015), basic blocks, projection shortcuts (option B).

    torchvision's shortcuts; the paper's Table 2 net is shortcut="A"."""
    return _resnet(18, num_classes, **kwargs)


@register_model()
def resnet34(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-34 (He et al. 2015), basic blocks, projection shortcuts (option B).

    Table 3's B row; Table 2's net is shortcut="A"."""
    return _resnet(34, num_classes, **kwargs)


@register_model()
def resnet50(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-50 (He et al. 2015), bottlenecks strided in the first 1x1 as in the paper."""
    return _resnet(50, num_classes, **kwargs)


@register_model()
def resnet101(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-101 (He et al. 2015), bottlenecks strided in the first 1x1 as in the paper."""
    return _resnet(101, num_classes, **kwargs)


@register_model()
def resnet152(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-152 (He et al. 2015), bottlenecks strided in the first 1x1 as in the paper."""
    return _resnet(152, num_classes, **kwargs)


@register_model()
def resnet50_v1_5(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-50 v1.5 (torchvision's): the stride sits in the bottleneck's 3x3 convolution."""
    return _resnet(50, num_classes, stride_in_1x1=False, **kwargs)


@register_model()
def resnet101_v1_5(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-101 v1.5 (torchvision's): the stride sits in the bottleneck's 3x3 convolution."""
    return _resnet(101, num_classes, stride_in_1x1=False, **kwargs)


@register_model()
def resnet152_v1_5(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-152 v1.5 (torchvision's): the stride sits in the bottleneck's 3x3 convolution."""
    return _resnet(152, num_classes, stride_in_1x1=False, **kwargs)


@register_model()
def plain18(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """Plain-18 (He et al. 2015, section 3.3): ResNet-18's layers without shortcuts."""
    return _resnet(18, num_classes, shortcut=None, **kwargs)


@register_model()
def plain34(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """Plain-34 (He et al. 2015, Fig. 3 middle): ResNet-34's layers without shortcuts."""
    return _resnet(34, num_classes, shortcut=None, **kwargs)
