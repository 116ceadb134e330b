"""AlexNet: Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep Convolutional
Neural Networks" (NIPS 2012, Figure 2 and sections 3-5), and the single-tower variant torchvision
ships, which it credits to Krizhevsky's "One weird trick for parallelizing convolutional neural
networks" (2014).
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from canon.models.base import EvalConfig, register_model
from canon.models.init import normal_
from canon.models.layers import FCHead, FCHeadNet, LocalResponseNorm

# Layers whose biases the paper sets to 1 (section 5); all others start at 0.
BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")


def conv_stage(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    norm: bool = False,
    norm_groups: int = 1,
    pool: bool = False,
    pool_before_norm: bool = False,
    ceil_mode: bool = False,
) -> nn.Sequential:
    """conv -> ReLU [-> LRN] [-> 3x3/2 max pool], AlexNet's order (sections 3.3, 3.5).

    `groups` are the convolution's channel groups, `norm_groups` the LRN's (AlexNet's towers).
    ZFNet pools before it normalises (`pool_before_norm`) and needs Caffe's ceil-mode pooling
    (`ceil_mode`) for its Figure 3 sizes.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups),
        relu=nn.ReLU(inplace=True),
    )
    after = [
        ("norm", LocalResponseNorm(groups=norm_groups) if norm else None),
        ("pool", nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=ceil_mode) if pool else None),
    ]
    for name, layer in reversed(after) if pool_before_norm else after:
        if layer is not None:
            layers[name] = layer
    return nn.Sequential(layers)


class AlexNet(FCHeadNet):
    """The 2012 paper's AlexNet: two towers as channel groups, per-tower LRN, 227x227 input.

    As the paper (Figure 2, sections 3-5):
    - conv1 96 x 11x11 stride 4; conv2 256 x 5x5; conv3 384, conv4 384, conv5 256, all 3x3; ReLU
      after every layer; local response normalisation (k=2, n=5, alpha=1e-4, beta=0.75) after
      the ReLU of conv1 and conv2; overlapping 3x3 stride 2 max pooling after both
      normalisations and after conv5 (sections 3.3, 3.4).
    - The two GPU towers are channel groups of 2: conv2, conv4 and conv5 see only the maps of
      their own tower, conv3 sees both (Figure 2, section 3.2). fc6 and fc7 of the towers are one
      4096-wide layer each, as the towers exchange all activations there.
    - Each tower normalises only its own maps: the LRN after conv1 and conv2 runs over two
      channel groups (48 + 48, then 128 + 128 maps), its window clipped at the tower boundary,
      as each GPU normalised what it held; the towers meet only at conv3 and the FC layers.
    - fc6, fc7 4096 with dropout 0.5 on their outputs (section 4.2); fc8 one output per class.
    - Initialisation (section 5): weights N(0, 0.01); biases 1 in conv2, conv4, conv5 and the
      fully connected hidden layers fc6, fc7; 0 in conv1, conv3 and fc8 (the paper's "hidden
      layers" excludes the output layer).
    - 60,965,224 parameters at 1000 classes.

    Deviations and choices:
    - Input 227x227, as Caffe's reference model, instead of the paper's 224x224: with 224 and no
      padding conv1 would give (224 - 11) / 4 + 1 = 54.25 positions; 227 gives the paper's
      55x55. conv2 pads 2 and conv3-5 pad 1, keeping 27x27 and 13x13 as in Figure 2; pool5
      gives 6x6.
    """

    eval_config = EvalConfig(input_size=227, resize_size=256, fit="center-square")  # s2
    min_input_size = 227
    fixed_input_size = 227

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        towers = {"norm": True, "norm_groups": 2}  # each tower normalises its own maps
        features = nn.Sequential(OrderedDict(
            conv1=conv_stage(3, 96, 11, stride=4, pool=True, **towers),       # N x 96 x 27 x 27
            conv2=conv_stage(96, 256, 5, padding=2, groups=2, pool=True,
                             **towers),                                       # N x 256 x 13 x 13
            conv3=conv_stage(256, 384, 3, padding=1),                         # N x 384 x 13 x 13
            conv4=conv_stage(384, 384, 3, padding=1, groups=2),               # N x 384 x 13 x 13
            conv5=conv_stage(384, 256, 3, padding=1, groups=2, pool=True),    # N x 256 x 6 x 6
        ))
        head = FCHead(256, 6, num_classes, dropout=dropout)                   # N x num_classes
        super().__init__(features, head)
        for name, stage in self.stages:
            normal_(stage.conv, std=0.01, bias=1.0 if name in BIAS_ONE else 0.0)
        for name in ("fc6", "fc7", "fc8"):
            normal_(getattr(head, name), std=0.01, bias=1.0 if name in BIAS_ONE else 0.0)

    def init_classifier(self, layer: nn.Linear) -> None:
        normal_(layer, std=0.01, bias=0.0)


class AlexNetOWT(FCHeadNet):
    """torchvision's single-tower AlexNet (64-192-384-256-256, no LRN, adaptive 6x6 pool).

    torchvision credits it to Krizhevsky's "One weird trick for parallelizing convolutional
    neural networks" (2014): conv1-5 with 64, 192, 384, 256, 256 channels (conv1 pads 2), no
    normalisation, an adaptive 6x6 average pool before fc6 so any input from 63x63 up works, 224
    input; 61,100,840 parameters at 1000 classes, the same weight shapes as torchvision's
    `alexnet` (its state dict maps one to one).

    Differences from torchvision: dropout acts on the outputs of fc6 and fc7, as in the 2012
    paper, where torchvision drops the inputs of fc6 and fc7; weights keep PyTorch's default
    initialisation, as torchvision's.
    """

    min_input_size = 63

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        features = nn.Sequential(OrderedDict(
            conv1=conv_stage(3, 64, 11, stride=4, padding=2, pool=True),      # N x 64 x 27 x 27
            conv2=conv_stage(64, 192, 5, padding=2, pool=True),               # N x 192 x 13 x 13
            conv3=conv_stage(192, 384, 3, padding=1),                         # N x 384 x 13 x 13
            conv4=conv_stage(384, 256, 3, padding=1),                         # N x 256 x 13 x 13
            conv5=conv_stage(256, 256, 3, padding=1, pool=True),              # N x 256 x 6 x 6
        ))
        head = FCHead(256, 6, num_classes, dropout=dropout, adaptive_pool=True)
        super().__init__(features, head)

    def init_classifier(self, layer: nn.Linear) -> None:
        layer.reset_parameters()


@register_model()
def alexnet(num_classes: int = 1000, **kwargs) -> AlexNet:
    """AlexNet (2012 paper): two towers as groups, LRN, 227 input; 60.97M params."""
    return AlexNet(num_classes=num_classes, **kwargs)


@register_model()
def alexnet_owt(num_classes: int = 1000, **kwargs) -> AlexNetOWT:
    """AlexNet, torchvision's single-tower 'one weird trick' variant; 61.10M params."""
    return AlexNetOWT(num_classes=num_classes, **kwargs)
