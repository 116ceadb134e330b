"""VGG: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition" (ICLR 2015, arXiv:1409.1556), configurations A to E of Table 1 (section 2.1), with
torchvision's batch-normalised variants.
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from canon.errors import ConfigError
from canon.models.base import EvalConfig, register_model
from canon.models.init import normal_, xavier_
from canon.models.layers import FCHead, FCHeadNet, LocalResponseNorm

# Table 1 of the paper, one tuple per stage conv1..conv5; a 2x2 max pool ends every stage.
# "conv3-64" is a 3x3 convolution with 64 output channels, "LRN" local response normalisation.
# Stage outputs at 224x224: conv1 N x 64 x 112 x 112, conv2 N x 128 x 56 x 56,
# conv3 N x 256 x 28 x 28, conv4 N x 512 x 14 x 14, conv5 N x 512 x 7 x 7.
CONFIGS: dict[str, tuple[tuple[str, ...], ...]] = {
    "A": (
        ("conv3-64",),
        ("conv3-128",),
        ("conv3-256", "conv3-256"),
        ("conv3-512", "conv3-512"),
        ("conv3-512", "conv3-512"),
    ),
    "A-LRN": (
        ("conv3-64", "LRN"),
        ("conv3-128",),
        ("conv3-256", "conv3-256"),
        ("conv3-512", "conv3-512"),
        ("conv3-512", "conv3-512"),
    ),
    "B": (
        ("conv3-64", "conv3-64"),
        ("conv3-128", "conv3-128"),
        ("conv3-256", "conv3-256"),
        ("conv3-512", "conv3-512"),
        ("conv3-512", "conv3-512"),
    ),
    "C": (
        ("conv3-64", "conv3-64"),
        ("conv3-128", "conv3-128"),
        ("conv3-256", "conv3-256", "conv1-256"),
        ("conv3-512", "conv3-512", "conv1-512"),
        ("conv3-512", "conv3-512", "conv1-512"),
    ),
    "D": (
        ("conv3-64", "conv3-64"),
        ("conv3-128", "conv3-128"),
        ("conv3-256", "conv3-256", "conv3-256"),
        ("conv3-512", "conv3-512", "conv3-512"),
        ("conv3-512", "conv3-512", "conv3-512"),
    ),
    "E": (
        ("conv3-64", "conv3-64"),
        ("conv3-128", "conv3-128"),
        ("conv3-256", "conv3-256", "conv3-256", "conv3-256"),
        ("conv3-512", "conv3-512", "conv3-512", "conv3-512"),
        ("conv3-512", "conv3-512", "conv3-512", "conv3-512"),
    ),
}


def vgg_stage(
    index: int, in_channels: int, layers: tuple[str, ...], batch_norm: bool
) -> tuple[nn.Sequential, int]:
    """Stage conv{index}: its layers named as Caffe's VGG models (conv3_1, relu3_1, ...)."""
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    channels = in_channels
    for position, spec in enumerate(layers, start=1):
        if spec == "LRN":
            modules[f"norm{index}"] = LocalResponseNorm()  # the class defaults are AlexNet's
            continue
        kind, width = spec.split("-")
        kernel_size = int(kind.removeprefix("conv"))
        suffix = f"{index}_{position}"
        modules[f"conv{suffix}"] = nn.Conv2d(channels, int(width), kernel_size,
                                             padding=kernel_size // 2)
        if batch_norm:
            modules[f"bn{suffix}"] = nn.BatchNorm2d(int(width))
        modules[f"relu{suffix}"] = nn.ReLU(inplace=True)
        channels = int(width)
    modules[f"pool{index}"] = nn.MaxPool2d(kernel_size=2, stride=2)
    return nn.Sequential(modules), channels


# VGG's initialisations: section 3.1's random one (std 0.01) and Glorot & Bengio's.
INITS = {"normal": normal_, "glorot": xavier_}


class VGG(FCHeadNet):
    """A VGG configuration of Table 1 ("A", "A-LRN", "B", "C", "D", "E").

    As the paper (section 2.1, Table 1):
    - 3x3 convolutions with stride 1 and 1-pixel padding; configuration C's 1x1 convolutions pad
      0; ReLU after every convolution; 2x2 stride 2 max pooling after each of the five stages.
    - A-LRN adds local response normalisation after conv1_1 with the parameters of Krizhevsky et
      al. (k=2, n=5, alpha=1e-4, beta=0.75).
    - fc6, fc7 4096 with dropout 0.5 on their outputs (section 3.1); fc8 one output per class.
    - Input 224x224; the FC head takes that size only, `fully_convolutional()` any size from 224
      up (fc6 as a 7x7 convolution, fc7 and fc8 as 1x1), as the paper's dense evaluation
      (section 3.2).
    - Initialisation (`init`): "normal", section 3.1's for configuration A and for the layers
      of deeper nets not copied from A: weights from a zero-mean normal of "10^-2 variance",
      biases 0; canon reads it as std 0.01, AlexNet's (section 5) that VGG follows (read
      literally, std 0.1). "glorot" (the default): Glorot & Bengio's uniform, biases 0, which
      the paper notes (end of section 3.1) trains the deep configurations from scratch
      without pre-training from A; canon's one-stage recipes (vgg16, vgg19) rely on it.
    - Parameter counts equal torchvision's: vgg11 132,863,336, vgg13 133,047,848, vgg16
      138,357,544, vgg19 143,667,240; C (vgg16_c) has 133,638,952 (the paper's Table 2: 134M).

    Variants beyond the paper: `batch_norm=True` (the `_bn` models) puts batch normalisation
    between each convolution (which keeps its bias, as torchvision's) and its ReLU, as
    torchvision's vgg*_bn (batch normalisation came after VGG). torchvision also adds an adaptive
    7x7 average pool before fc6 so its FC head takes any size; canon keeps the paper's fixed 224
    and offers `fully_convolutional()`.
    """

    eval_config = EvalConfig(input_size=224, resize_size=256)
    min_input_size = 224
    fixed_input_size = 224

    def __init__(
        self,
        config: str,
        num_classes: int = 1000,
        batch_norm: bool = False,
        dropout: float = 0.5,
        init: str = "glorot",
    ) -> None:
        if config not in CONFIGS:
            raise ConfigError(f"unknown VGG configuration {config!r}; Table 1 has {list(CONFIGS)}")
        if init not in INITS:
            raise ConfigError(f"unknown VGG init {init!r}; choose from {', '.join(INITS)}")
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        channels = 3
        for index, layers in enumerate(CONFIGS[config], start=1):
            stages[f"conv{index}"], channels = vgg_stage(index, channels, layers, batch_norm)
        head = FCHead(channels, 7, num_classes, dropout=dropout)              # N x num_classes
        super().__init__(nn.Sequential(stages), head)
        self.config, self.init_weights = config, INITS[init]
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                self.init_weights(module)

    def init_classifier(self, layer: nn.Linear) -> None:
        self.init_weights(layer)


@register_model()
def vgg11(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG-11, configuration A; 132.86M params."""
    return VGG("A", num_classes=num_classes, **kwargs)


@register_model()
def vgg11_lrn(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG-11 with LRN after conv1_1, configuration A-LRN; 132.86M params."""
    return VGG("A-LRN", num_classes=num_classes, **kwargs)


@register_model()
def vgg13(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG-13, configuration B; 133.05M params."""
    return VGG("B", num_classes=num_classes, **kwargs)


@register_model()
def vgg16_c(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG-16, configuration C (1x1 convs in the last three stages); 133.64M params."""
    return VGG("C", num_classes=num_classes, **kwargs)


@register_model()
def vgg16(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG-16, configuration D; 138.36M params."""
    return VGG("D", num_classes=num_classes, **kwargs)


@register_model()
def vgg19(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG-19, configuration E; 143.67M params."""
    return VGG("E", num_classes=num_classes, **kwargs)


@register_model()
def vgg11_bn(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG-11 (A) with batch normalisation, as torchvision's; 132.87M params."""
    return VGG("A", num_classes=num_classes, batch_norm=True, **kwargs)


@register_model()
def vgg13_bn(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG-13 (B) with batch normalisation, as torchvision's; 133.05M params."""
    return VGG("B", num_classes=num_classes, batch_norm=True, **kwargs)


@register_model()
def vgg16_bn(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG-16 (D) with batch normalisation, as torchvision's; 138.37M params."""
    return VGG("D", num_classes=num_classes, batch_norm=True, **kwargs)


@register_model()
def vgg19_bn(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG-19 (E) with batch normalisation, as torchvision's; 143.68M params."""
    return VGG("E", num_classes=num_classes, batch_norm=True, **kwargs)
