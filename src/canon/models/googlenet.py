"""GoogLeNet, Inception v1 (Szegedy et al., "Going Deeper with Convolutions", 2014, Table 1,
Fig. 3 and section 5), completed where the paper is silent by Caffe's bvlc_googlenet replication,
and torchvision's batch-normalised variant.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from canon.models.base import register_model
from canon.models.init import caffe_xavier_
from canon.models.layers import LocalResponseNorm, PooledHeadNet, fresh_classifier

# Table 1: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj; output N x C x H x W at 224.
INCEPTION_TABLE: dict[str, tuple[int, int, int, int, int, int]] = {
    "inception3a": (64, 96, 128, 16, 32, 32),  # N x 256 x 28 x 28
    "inception3b": (128, 128, 192, 32, 96, 64),  # N x 480 x 28 x 28
    "inception4a": (192, 96, 208, 16, 48, 64),  # N x 512 x 14 x 14
    "inception4b": (160, 112, 224, 24, 64, 64),  # N x 512 x 14 x 14
    "inception4c": (128, 128, 256, 24, 64, 64),  # N x 512 x 14 x 14
    "inception4d": (112, 144, 288, 32, 64, 64),  # N x 528 x 14 x 14
    "inception4e": (256, 160, 320, 32, 128, 128),  # N x 832 x 14 x 14
    "inception5a": (256, 160, 320, 32, 128, 128),  # N x 832 x 7 x 7
    "inception5b": (384, 192, 384, 48, 128, 128),  # N x 1024 x 7 x 7
}
# Max pools (3x3/2) precede these stages, as Table 1's rows.
POOL_BEFORE = {"inception3a": "pool2", "inception4a": "pool3", "inception5a": "pool4"}
AUX_AFTER = ("inception4a", "inception4d")
AUX_MAP_SIZE = 4
# inception4 map sizes the paper's 5x5/3 pool turns into 4x4 (inputs of 223 to 270 pixels).
PAPER_AUX_INPUT_MAPS = range(14, 17)

ConvLayer = Callable[..., nn.Module]


def conv_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Module:
    """The paper's convolution: biased, 'same' padding, followed by a ReLU."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2),
        relu=nn.ReLU(inplace=True),
    ))


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
) -> nn.Module:
    """torchvision's convolution for googlenet_bn: no bias, batch norm (eps 1e-3), ReLU."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                       bias=False),
        bn=nn.BatchNorm2d(out_channels, eps=1e-3),
        relu=nn.ReLU(inplace=True),
    ))


def max_pool(kernel_size: int = 3) -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size, stride=2, ceil_mode=True)


def googlenet_lrn() -> LocalResponseNorm:
    """Caffe's LRN (size 5, its alpha 1e-4 averaged over the window), k = 1."""
    return LocalResponseNorm(size=5, alpha=1e-4 / 5, beta=0.75, k=1.0)


class Inception(nn.Module):
    """Four parallel branches concatenated along channels (Fig. 2b)."""

    def __init__(
        self,
        in_channels: int,
        widths: tuple[int, int, int, int, int, int],
        conv: ConvLayer = conv_relu,
        wide_kernel: int = 5,
    ) -> None:
        super().__init__()
        n1x1, n3x3_reduce, n3x3, n5x5_reduce, n5x5, pool_proj = widths
        self.branch1x1 = conv(in_channels, n1x1, 1)
        self.branch3x3 = nn.Sequential(conv(in_channels, n3x3_reduce, 1),
                                       conv(n3x3_reduce, n3x3, 3))
        self.branch5x5 = nn.Sequential(conv(in_channels, n5x5_reduce, 1),
                                       conv(n5x5_reduce, n5x5, wide_kernel))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                         conv(in_channels, pool_proj, 1))
        self.out_channels = n1x1 + n3x3 + n5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1x1, self.branch3x3, self.branch5x5, self.branch_pool)
        return torch.cat([branch(x) for branch in branches], dim=1)


class AuxClassifier(nn.Module):
    """Section 5's auxiliary classifier on a 14x14 map of inception4a or inception4d."""

    def __init__(
        self, in_channels: int, num_classes: int, conv: ConvLayer = conv_relu,
        dropout: float = 0.7,
    ) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(5, stride=3)
        self.conv = conv(in_channels, 128, 1)
        self.fc1 = nn.Linear(128 * AUX_MAP_SIZE * AUX_MAP_SIZE, 1024)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if all(size in PAPER_AUX_INPUT_MAPS for size in x.shape[-2:]):
            x = self.pool(x)
        else:  # other input sizes: torchvision's adaptive pool to the 4x4 the fc layer reads
            x = F.adaptive_avg_pool2d(x, AUX_MAP_SIZE)
        x = self.conv(x)
        x = self.dropout(self.relu(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)


class GoogLeNet(PooledHeadNet):
    """Stages conv1 .. inception5b as Table 1's rows, then global average pool, dropout, fc.

    The defaults are the paper's network (Table 1, Fig. 3): true 5x5 convolutions in the third
    branch, biases on every convolution, ReLU after each, no batch norm; local response
    normalisation after the first max pool and after conv2's 3x3 convolution; a global average
    pool, dropout 0.4 and a linear classifier. Two auxiliary classifiers (section 5) read
    inception4a and inception4d: 5x5/3 average pool (4 x 4 x 512 and 4 x 4 x 528 at 224x224),
    1x1 convolution of 128 + ReLU, fc 1024 + ReLU, dropout 0.7, linear classifier. They exist
    only on the explicit training path `forward_with_aux` (the paper weights their losses by
    0.3) and never in `forward`.

    Where the paper is silent, canon follows Caffe's bvlc_googlenet replication (Szegedy helped
    it):

    - Padding: 7x7/2 conv pad 3, 3x3 convs pad 1, 5x5 convs pad 2, and every 3x3/2 max pool
      without padding but rounding its output size up (Caffe's pooling arithmetic,
      `ceil_mode=True`). That is what makes 224 come out at Table 1's sizes 112, 56, 28, 14 and 7.
    - LRN: Caffe's local_size 5, alpha 1e-4 (averaged over the window, i.e. 2e-5 on the paper's
      sum convention of `LocalResponseNorm`), beta 0.75, k 1.
    - Initialisation: Caffe's "xavier" filler U(+-sqrt(3 / fan_in)) for every weight, biases 0.2
      on convolutions and the auxiliary fc 1024 layers, 0 on the classifiers (the paper does not
      say).

    Deviations:

    - Table 1's "avg pool 7x7/1" is a global average pool here, so any input of at least 32x32
      runs (the final map is 1x1 there, the total stride being 32). The auxiliary classifiers'
      fc layers read a 4x4 map: for inputs of 223 to 270 pixels (224 in the paper) the paper's
      5x5/3 average pool makes it; for other sizes an adaptive average pool to 4x4 does
      (torchvision's choice at every size), so that training at, say, 128 pixels keeps the
      auxiliary losses.
    - Table 1's params column (weights only, in units of 1,024) disagrees with the table's own
      filter counts, which the model follows, in five rows: conv1 2.7K (7 x 7 x 3 x 64 is 9.2K),
      inception4c 463K (497.5K), 4d 580K (590.5K), 5a 1072K (1018K), 5b 1388K (1409K). The
      column's total, 6,798K, is within 0.5% of the model's 6,826K weights (6,998,552
      parameters with biases, 1000 classes, without the auxiliary heads).

    `batch_norm`, `wide_kernel`, `lrn`, `dropout` and `pool4_kernel` make torchvision's variant
    (`googlenet_bn`).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        aux_logits: bool = True,
        batch_norm: bool = False,
        wide_kernel: int = 5,
        lrn: bool = True,
        dropout: float = 0.4,
        aux_dropout: float = 0.7,
        pool4_kernel: int = 3,
    ) -> None:
        super().__init__()
        conv = conv_bn_relu if batch_norm else conv_relu
        pool1 = [max_pool()]
        conv2 = [conv(64, 64, 1), conv(64, 192, 3)]
        if lrn:  # LRN closes the pool1 and conv2 stages (Fig. 3); googlenet_bn has none
            pool1.append(googlenet_lrn())
            conv2.append(googlenet_lrn())
        stages: list[tuple[str, nn.Module]] = [
            ("conv1", conv(3, 64, 7, stride=2)),  # N x 64 x 112 x 112
            ("pool1", nn.Sequential(*pool1)),  # N x 64 x 56 x 56
            ("conv2", nn.Sequential(*conv2)),  # N x 192 x 56 x 56 (1x1 reduce, then 3x3)
        ]
        in_channels = 192
        aux_channels = {}
        for name, widths in INCEPTION_TABLE.items():
            if name in POOL_BEFORE:
                pool = POOL_BEFORE[name]
                stages.append((pool, max_pool(pool4_kernel if pool == "pool4" else 3)))
            module = Inception(in_channels, widths, conv, wide_kernel)
            stages.append((name, module))
            in_channels = module.out_channels
            aux_channels[name] = in_channels
        for name, module in stages:
            self.add_stage(name, module)
        self.add_classifier(in_channels, num_classes, dropout)
        self.aux1 = self.aux2 = None
        if aux_logits:
            self.aux1, self.aux2 = (
                AuxClassifier(aux_channels[name], num_classes, conv, aux_dropout)
                for name in AUX_AFTER
            )
        self._init_weights()

    def _init_weights(self) -> None:
        classifiers = {self.fc} | {aux.fc2 for aux in self.aux_classifiers()}
        for module in self.modules():
            if module in classifiers:
                self.init_classifier(module)
            elif isinstance(module, nn.Conv2d | nn.Linear):
                caffe_xavier_(module, bias=0.2)

    def aux_classifiers(self) -> list[AuxClassifier]:
        return [aux for aux in (self.aux1, self.aux2) if aux is not None]

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The training path: main logits and the auxiliary logits (4a's, then 4d's).

        The list is empty for a model built with aux_logits=False. The paper adds the auxiliary
        losses with weight 0.3 during training and discards the heads at inference.
        """
        self.check_input(x)
        heads = dict(zip(AUX_AFTER, self.aux_classifiers(), strict=False))
        aux_logits = []
        for name, stage in self.stages:
            x = stage(x)
            if name in heads:
                aux_logits.append(heads[name](x))
        return self.forward_head(x), aux_logits

    def init_classifier(self, layer: nn.Linear) -> None:
        caffe_xavier_(layer)  # biases 0, as every classifier at construction

    def class_layers(self) -> list[nn.Module]:
        return [self.classifier, *(aux.fc2 for aux in self.aux_classifiers())]

    def reset_classifier(self, num_classes: int) -> None:
        """Fresh classifiers for `num_classes`: the main one and the auxiliary ones."""
        super().reset_classifier(num_classes)
        for aux in self.aux_classifiers():
            aux.fc2 = fresh_classifier(aux.fc2, num_classes, self.init_classifier)


@register_model()
def googlenet(num_classes: int = 1000, **kwargs: Any) -> GoogLeNet:
    """GoogLeNet / Inception v1 (Szegedy et al. 2014): true 5x5 branches, LRN, 2 aux heads."""
    return GoogLeNet(num_classes, **kwargs)


@register_model()
def googlenet_bn(num_classes: int = 1000, **kwargs: Any) -> GoogLeNet:
    """GoogLeNet as torchvision builds it: batch norm, 3x3 in the "5x5" branch, no LRN.

    torchvision's variant, not the paper's: batch norm (eps 1e-3) after every convolution,
    which then has no bias; 3x3 convolutions in the "5x5" branch; no LRN; dropout 0.2; stage 4
    closed by a 2x2/2 max pool (the paper's is 3x3/2; both give 7x7 at 224), so torchvision's
    ImageNet weights give torchvision's outputs (canon.transfer.from_torchvision). The
    initialisation rule is `googlenet`'s.
    """
    options: dict[str, Any] = {"batch_norm": True, "wide_kernel": 3, "lrn": False,
                               "dropout": 0.2, "pool4_kernel": 2}
    return GoogLeNet(num_classes, **{**options, **kwargs})
