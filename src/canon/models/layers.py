"""Layers the canon shares: the papers' local response normalisation (Krizhevsky et al. 2012,
section 3.3) and the two kinds of head, fully connected (`FCHeadNet`) and pooled (`PooledHeadNet`).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from canon.errors import InputSizeError
from canon.models.base import CanonModel, check_num_classes


class LocalResponseNorm(nn.Module):
    """Local response normalisation across channels, in the notation of Krizhevsky et al. (2012).

    Section 3.3 of the AlexNet paper: b_i = a_i / (k + alpha * sum_j a_j^2)^beta, the sum running
    over the n channels j = i - n/2 .. i + n/2 (clipped at the ends), with k=2, n=5, alpha=1e-4,
    beta=0.75. `alpha` here multiplies the plain sum, as in the paper.

    `groups` splits the channels into that many consecutive groups normalised separately, the
    window clipped at each group's ends: AlexNet's two GPUs each normalised only their own maps.

    torch.nn.LocalResponseNorm and Caffe's LRN layer divide their alpha by n (they average the
    squares instead of summing them), so the paper's alpha=1e-4 is their alpha=5e-4; this class
    passes `alpha * size` to torch for that reason. The window is the same: for n=5, torch pads two
    channels on either side, i.e. channels i-2 .. i+2. Caffe's default k is 1, not the paper's 2.
    """

    def __init__(
        self,
        size: int = 5,
        alpha: float = 1e-4,
        beta: float = 0.75,
        k: float = 2.0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        if groups < 1:
            raise ValueError(f"LocalResponseNorm needs at least one channel group, got {groups}")
        self.size, self.alpha, self.beta, self.k, self.groups = size, alpha, beta, k, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        if channels % self.groups:
            raise ValueError(
                f"LocalResponseNorm with {self.groups} groups cannot split {channels} channels"
            )
        # Each group becomes an image of its own: torch's window then stops at the group's ends.
        grouped = x.reshape(batch * self.groups, channels // self.groups, *x.shape[2:])
        # A bfloat16 or float16 input is normalised in float32, as autocast does: k + alpha x
        # sum carries the sum in its low bits, and torch's CPU kernels have no bfloat16 form.
        precise = grouped.to(torch.promote_types(grouped.dtype, torch.float32))
        normalised = F.local_response_norm(precise, self.size, alpha=self.alpha * self.size,
                                           beta=self.beta, k=self.k)
        out = normalised.to(x.dtype).reshape(x.shape)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            # Folding the groups into the batch copied it out of channels_last: the next
            # convolution would copy it back.
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def extra_repr(self) -> str:
        return (f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, "
                f"groups={self.groups}")


def linear_to_conv(linear: nn.Linear, in_channels: int, kernel_size: int) -> nn.Conv2d:
    """A convolution computing `linear` at every kernel_size x kernel_size window of its input.

    `linear` must read a C x k x k map flattened in PyTorch's C, H, W order; its weights are copied,
    so the convolution is a snapshot that later training of `linear` does not change.
    """
    expected = in_channels * kernel_size * kernel_size
    if linear.in_features != expected:
        raise ValueError(
            f"a Linear with {linear.in_features} inputs cannot read a {in_channels} x "
            f"{kernel_size} x {kernel_size} map ({expected} values)"
        )
    weight = linear.weight
    conv = nn.Conv2d(in_channels, linear.out_features, kernel_size, bias=linear.bias is not None,
                     device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight.reshape(conv.weight.shape))
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv


def fresh_classifier(
    old: nn.Linear, num_classes: int, init: Callable[[nn.Linear], None]
) -> nn.Linear:
    """A new `num_classes`-way linear layer reading what `old` reads (its device and dtype too),
    initialised by `init`, the family's rule for a classifier."""
    check_num_classes(num_classes)
    weight = old.weight
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    init(new)
    return new


class FCHead(nn.Module):
    """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> fc8 on a flattened C x k x k map.

    Dropout sits on the outputs of fc6 and fc7 (AlexNet section 4.2, Caffe's drop6/drop7).
    `adaptive_pool` first pools any map to k x k, as torchvision's AlexNet does; the papers' nets
    have no such pooling and take one input size.
    """

    def __init__(
        self,
        in_channels: int,
        map_size: int,
        num_classes: int,
        hidden_features: int = 4096,
        dropout: float = 0.5,
        adaptive_pool: bool = False,
    ) -> None:
        super().__init__()
        check_num_classes(num_classes)
        self.in_channels, self.map_size = in_channels, map_size
        self.avgpool = nn.AdaptiveAvgPool2d(map_size) if adaptive_pool else None
        self.fc6 = nn.Linear(in_channels * map_size * map_size, hidden_features)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Linear(hidden_features, hidden_features)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(dropout)
        self.fc8 = nn.Linear(hidden_features, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.avgpool is not None:
            x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.drop6(self.relu6(self.fc6(x)))
        x = self.drop7(self.relu7(self.fc7(x)))
        return x if pre_logits else self.fc8(x)

    def to_conv(self) -> nn.Sequential:
        """The head as convolutions (fc6 k x k, fc7 and fc8 1x1), with copies of the weights;
        with `adaptive_pool`, maps smaller than k x k pooled up to it first, as forward does."""
        upsample = {"avgpool": PoolUpTo(self.map_size)} if self.avgpool is not None else {}
        return nn.Sequential(OrderedDict(
            **upsample,
            fc6=linear_to_conv(self.fc6, self.in_channels, self.map_size),
            relu6=nn.ReLU(inplace=True),
            drop6=nn.Dropout(self.drop6.p),
            fc7=linear_to_conv(self.fc7, self.fc7.in_features, 1),
            relu7=nn.ReLU(inplace=True),
            drop7=nn.Dropout(self.drop7.p),
            fc8=linear_to_conv(self.fc8, self.fc8.in_features, 1),
        ))


class PoolUpTo(nn.Module):
    """Adaptive average pooling of a side shorter than `size` up to it, other sides kept: a
    map torchvision's AlexNet pools to 6 x 6 in training still meets the 6 x 6 fc6 kernel."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if min(height, width) >= self.size:
            return x
        return F.adaptive_avg_pool2d(x, (max(height, self.size), max(width, self.size)))


class FullyConvolutional(nn.Module):
    """Images N x 3 x H x W to class-score maps N x K x h x w (h = w = 1 at the training size)."""

    def __init__(self, features: nn.Sequential, head: nn.Sequential, min_input_size: int,
                 model_name: str) -> None:
        super().__init__()
        self.features, self.head = features, head
        self.min_input_size, self.model_name = min_input_size, model_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if min(height, width) < self.min_input_size:
            raise InputSizeError(
                f"fully convolutional {self.model_name} needs inputs of at least "
                f"{self.min_input_size}x{self.min_input_size}, got {height}x{width}"
            )
        return self.head(self.features(x))


def dense_copy(model: CanonModel, head: nn.Sequential, min_input_size: int) -> FullyConvolutional:
    """A copy of `model`'s stages followed by `head`, in `model`'s train/eval mode."""
    features = copy.deepcopy(nn.Sequential(OrderedDict(model.stages)))
    dense = FullyConvolutional(features, head, min_input_size, type(model).__name__)
    return dense.train(model.training)


class FCHeadNet(CanonModel):
    """Named convolutional stages (`features`) followed by an `FCHead`.

    The common body of AlexNet, ZFNet and VGG: the three fully connected layers of Krizhevsky et
    al. (2012), which `fully_convolutional()` turns into convolutions for dense evaluation (fc6
    as a k x k conv over the last feature map, fc7 and fc8 as 1x1 convs), as OverFeat and the
    VGG paper (section 3.2) evaluate their nets.

    Subclasses build both and define `init_classifier`, their paper's rule for a fresh fc8.
    """

    # Smallest input of the fully convolutional form: the size whose last feature map is k x k.
    # It equals `min_input_size` for the papers' nets, whose FC head takes one size only.
    dense_min_input_size: int | None = None

    def __init__(self, features: nn.Sequential, head: FCHead) -> None:
        super().__init__()
        self.features, self.head = features, head

    @property
    def stages(self) -> list[tuple[str, nn.Module]]:
        return list(self.features.named_children())

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def init_classifier(self, layer: nn.Linear) -> None:
        raise NotImplementedError

    @property
    def classifier(self) -> nn.Linear:
        return self.head.fc8

    def reset_classifier(self, num_classes: int) -> None:
        self.head.fc8 = fresh_classifier(self.head.fc8, num_classes, self.init_classifier)

    def fully_convolutional(self) -> FullyConvolutional:
        """A converted copy for dense evaluation; equal to `forward` at the training size."""
        return dense_copy(self, self.head.to_conv(),
                          self.dense_min_input_size or self.min_input_size)


class PooledHeadNet(CanonModel):
    """Named stages, then a global average pool, optional dropout and a linear classifier `fc`.

    The common body of GoogLeNet and the ResNets; `fully_convolutional()` applies the classifier
    at every position of the last feature map as a 1x1 convolution.

    Subclasses register their stages in order with `add_stage`, then call `add_classifier`, and
    define `init_classifier`, their paper's rule for a fresh fc. The head takes any map size.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stage_names: list[str] = []

    def add_stage(self, name: str, module: nn.Module) -> None:
        self.add_module(name, module)
        self.stage_names.append(name)

    def add_classifier(
        self, num_features: int, num_classes: int, dropout: float | None = None
    ) -> None:
        """The head: dropout (`None`: none) on the pooled `num_features`, then fc."""
        check_num_classes(num_classes)
        self.num_features = num_features
        self.dropout = nn.Dropout(dropout) if dropout is not None else None
        self.fc = nn.Linear(num_features, num_classes)

    @property
    def stages(self) -> list[tuple[str, nn.Module]]:
        return [(name, getattr(self, name)) for name in self.stage_names]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        if self.dropout is not None:
            x = self.dropout(x)
        return x if pre_logits else self.fc(x)

    def init_classifier(self, layer: nn.Linear) -> None:
        raise NotImplementedError

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = fresh_classifier(self.fc, num_classes, self.init_classifier)

    def fully_convolutional(self) -> FullyConvolutional:
        """A converted copy: dropout and the fc as a 1x1 convolution at every position.

        In eval mode the spatial mean of its score map equals `forward`'s logits (the pooling
        and the fc are both linear).
        """
        head: OrderedDict[str, nn.Module] = OrderedDict()
        if self.dropout is not None:
            head["dropout"] = nn.Dropout(self.dropout.p)
        head["fc"] = linear_to_conv(self.fc, self.num_features, 1)
        return dense_copy(self, nn.Sequential(head), self.min_input_size)
