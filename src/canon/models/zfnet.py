"""ZFNet: Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks" (ECCV 2014,
arXiv:1311.2901), the network of their Figure 3 (sections 3 and 4.1) and the larger model of
their Table 2.
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from canon.models.alexnet import conv_stage
from canon.models.base import EvalConfig, register_model
from canon.models.init import normal_
from canon.models.layers import FCHead, FCHeadNet


class ZFNet(FCHeadNet):
    """Zeiler & Fergus's Figure 3 network; `widths` are conv3, conv4, conv5's channels.

    As the paper (Figure 3, sections 3 and 4.1):
    - Input 224x224. conv1 96 x 7x7 stride 2 (AlexNet's 11x11 stride 4 made smaller and denser
      after the visualisations of Figure 6); conv2 256 x 5x5 stride 2; conv3 384, conv4 384,
      conv5 256, all 3x3 stride 1; ReLU after every layer; 3x3 stride 2 max pooling after conv1,
      conv2 and conv5; fc6, fc7 4096 with dropout 0.5; fc8 one output per class.
    - Layer 1 and 2 responses are pooled and then "contrast normalized across feature maps"
      (caption of Figure 3): pooling comes before normalisation, the reverse of AlexNet.
    - One tower: "the sparse connections used in Krizhevsky's layers 3,4,5 (due to the model
      being split across 2 GPUs) are replaced with dense connections" (section 3), so no channel
      groups.
    - Initialisation (section 3): weights N(0, 0.01) (the paper's "initialized to 10^-2" read as
      the standard deviation, as in AlexNet), biases 0.
    - 62,357,608 parameters at 1000 classes.
    - `widths=(512, 1024, 512)` is the larger model of Table 2 ("layers 3,4,5: 512,1024,512
      maps"; also Table 3), registered as `zfnet_wide`.

    Choices where the paper is silent, made so every map size of Figure 3 comes out exactly
    (224 -> 110 -> 55 -> 26 -> 13 -> 13 -> 13 -> 13 -> 6):
    - conv1 pads 1 pixel ((224 + 2 - 7) // 2 + 1 = 110); conv2 pads 0 ((55 - 5) // 2 + 1 = 26);
      conv3-5 pad 1.
    - Max pooling rounds up (Caffe's convention, `ceil_mode=True`): 110 -> 55 and 26 -> 13,
      where rounding down would give 54 and 12.
    - The contrast normalisation constants are not given; AlexNet's local response normalisation
      (k=2, n=5, alpha=1e-4, beta=0.75) is used.

    Not part of the model: the training-time renormalisation of conv filters whose RMS exceeds
    0.1 (section 3) is a step of the training loop, which this module does not implement.
    """

    eval_config = EvalConfig(input_size=224, resize_size=256, fit="center-square")  # s3
    min_input_size = 224
    fixed_input_size = 224
    dense_min_input_size = 207  # the smallest input whose pool5 map is still 6x6

    def __init__(
        self,
        num_classes: int = 1000,
        widths: tuple[int, int, int] = (384, 384, 256),
        dropout: float = 0.5,
    ) -> None:
        width3, width4, width5 = widths  # shape comments below are for the default widths
        zf_pool = {"pool": True, "pool_before_norm": True, "ceil_mode": True}
        features = nn.Sequential(OrderedDict(
            conv1=conv_stage(3, 96, 7, stride=2, padding=1, norm=True,
                             **zf_pool),                                      # N x 96 x 55 x 55
            conv2=conv_stage(96, 256, 5, stride=2, norm=True, **zf_pool),     # N x 256 x 13 x 13
            conv3=conv_stage(256, width3, 3, padding=1),                      # N x 384 x 13 x 13
            conv4=conv_stage(width3, width4, 3, padding=1),                   # N x 384 x 13 x 13
            conv5=conv_stage(width4, width5, 3, padding=1, **zf_pool),        # N x 256 x 6 x 6
        ))
        head = FCHead(width5, 6, num_classes, dropout=dropout)                # N x num_classes
        super().__init__(features, head)
        for _, stage in self.stages:
            normal_(stage.conv, std=0.01)
        for layer in (head.fc6, head.fc7, head.fc8):
            normal_(layer, std=0.01)

    def init_classifier(self, layer: nn.Linear) -> None:
        normal_(layer, std=0.01)


@register_model()
def zfnet(num_classes: int = 1000, **kwargs) -> ZFNet:
    """ZFNet (Zeiler & Fergus 2013): conv1 7x7/2, conv2 stride 2, one tower; 62.36M params."""
    return ZFNet(num_classes=num_classes, **kwargs)


@register_model()
def zfnet_wide(num_classes: int = 1000, **kwargs) -> ZFNet:
    """ZFNet with conv3-5 of 512, 1024, 512 maps (the larger model of the paper's Table 2)."""
    return ZFNet(num_classes=num_classes, widths=(512, 1024, 512), **kwargs)
