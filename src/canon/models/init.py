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
