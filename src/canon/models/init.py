"""Weight initialisation rules of the papers, as small functions on single layers.

Each family applies its paper's rule layer by layer in its constructor, so the rule reads next to
the architecture it belongs to; `reset_classifier` reuses the same function for the fresh layer.
"""

from __future__ import annotations

import torch.nn as nn

WeightLayer = nn.Conv2d | nn.Linear


def normal_(layer: WeightLayer, std: float = 0.01, bias: float = 0.0) -> None:
    """Weights from N(0, std^2), biases the constant `bias` (AlexNet section 5, ZFNet section 3)."""
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    if layer.bias is not None:
        nn.init.constant_(layer.bias, bias)


def xavier_(layer: WeightLayer) -> None:
    """Glorot & Bengio (2010) normalised init: U(+-sqrt(6 / (fan_in + fan_out))), biases 0.

    The VGG paper (end of section 3.1) notes this initialisation trains its nets from scratch
    without the staged pre-training of configuration A.
    """
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def kaiming_normal_(layer: WeightLayer) -> None:
    """He et al. (2015, "Delving deep into rectifiers") N(0, 2 / fan_out) weights, biases 0.

    The ResNet paper initialises "as in [13]" without naming a fan mode; fan-out (out channels x
    kernel area) is torchvision's choice and keeps the backward pass's variance steady.
    """
    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def caffe_xavier_(layer: WeightLayer, bias: float = 0.0) -> None:
    """Caffe's "xavier" filler, U(+-sqrt(3 / fan_in)), biases the constant `bias`.

    The GoogLeNet paper gives no initialisation; Caffe's bvlc_googlenet replication (readme:
    "uses xavier to initialize the weights instead of gaussian") pairs it with biases of 0.2 on
    convolutions and hidden FC layers and 0 on the classifiers. Unlike `xavier_`, Caffe's filler
    scales by fan-in alone.
    """
    fan_in = layer.weight[0].numel()
    bound = (3.0 / fan_in) ** 0.5
    nn.init.uniform_(layer.weight, -bound, bound)
    if layer.bias is not None:
        nn.init.constant_(layer.bias, bias)
