"""Test-time views: the crops, or whole images, a protocol feeds the network per image (AlexNet
s4.1, ZFNet s3, VGG s3.2, GoogLeNet s7, ResNet s3.4). `ProtocolViews` turns one raw uint8 image
into a list of view stacks, one per scale, each V x 3 x h x w, and `collate_views` batches
them for the DataLoader; scoring lives in canon.evaluation.protocols.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data.dataloader import default_collate

from canon.data.geometry import check_crop, crop_box, five_crop_boxes, resize_image
from canon.data.preprocess import EvalPreprocess
from canon.errors import ConfigError

BASE_VIEWS = ("center", "ten-crop", "dense", "144-crop")
VIEWS_PER_SCALE = {"center": 1, "ten-crop": 10, "dense": 2, "144-crop": 36}
GOOGLENET_SCALES = (256, 288, 320, 352)  # s7, for 224 x 224 crops
# On CIFAR's square 32 px images the three squares of 144-crop are one and its crops a few
# pixels apart: 144 forward passes per image (minutes on CIFAR's test set) on near-copies of
# the ten-crop views. Refused below this crop size.
MIN_144_CROP_SIZE = 64
PROTOCOLS = (
    "center",
    "ten-crop",
    "dense",
    "144-crop",
    "multi-scale",
    "multi-scale+center",
    "multi-scale+ten-crop",
    "multi-scale+dense",
)


@dataclass(frozen=True)
class Protocol:
    name: str
    base: str  # one of BASE_VIEWS
    multi_scale: bool

    @property
    def dense(self) -> bool:
        return self.base == "dense"


def parse_protocol(name: str) -> Protocol:
    """`center`, `ten-crop`, `dense`, `144-crop`, `multi-scale`, `multi-scale+<base>` (either
    order), as written in `canon eval --protocol`; plain `multi-scale` means multi-scale+center.
    """
    parts = [p.strip() for p in name.split("+")]
    multi = "multi-scale" in parts
    rest = [p for p in parts if p != "multi-scale"]
    if len(parts) > 2 or len(rest) > 1 or (rest and rest[0] not in BASE_VIEWS):
        raise ConfigError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    base = rest[0] if rest else "center"
    if base == "144-crop":  # its scales are part of its definition
        return Protocol(base, base, False)
    label = f"multi-scale+{base}" if multi else base
    return Protocol(label, base, multi)


def ten_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """10 x C x size x size: top-left, top-right, bottom-left, bottom-right, centre, then the
    same five of the reflected image (AlexNet s4.1)."""
    boxes = five_crop_boxes(*image.shape[-2:], size)
    crops = torch.stack([crop_box(image, top, left, size) for top, left in boxes])
    return torch.cat([crops, crops.flip(-1)])


def googlenet_crops(
    image: torch.Tensor, size: int, interpolation: str = "bilinear"
) -> torch.Tensor:
    """36 x C x size x size from one scale: three squares along the longer side, in each the
    four corners, the centre and the whole square resized; then the reflections."""
    height, width = image.shape[-2:]
    side = min(height, width)
    check_crop(height, width, size)
    offsets = (0, (max(height, width) - side) // 2, max(height, width) - side)
    crops = []
    for offset in offsets:
        if height > width:  # portrait: top, middle, bottom squares
            square = image[..., offset : offset + side, :]
        else:
            square = image[..., offset : offset + side]
        crops.append(ten_crop(square, size)[:5])
        crops.append(resize_image(square, size, size, interpolation).unsqueeze(0))
    crops = torch.cat(crops)
    return torch.cat([crops, crops.flip(-1)])


def dense_view(image: torch.Tensor) -> torch.Tensor:
    """2 x C x H x W: the whole image and its reflection (VGG s3.2)."""
    return torch.stack([image, image.flip(-1)])


class ProtocolViews:
    """Raw uint8 image -> list (one per scale) of normalised view stacks V x 3 x h x w.

    - center: one crop_size centre crop of the image rescaled to resize_size.
    - ten-crop (AlexNet s4.1): the four corner crops and the centre crop, and their reflections
      (ZFNet, s3: of the image's centred resize_size square, EvalPreprocess.center_square).
    - dense (VGG s3.2): the whole rescaled image through the fully convolutional network, the
      class score map spatially averaged; plus the horizontal reflection.
    - multi-scale (VGG s3.2/s4.2, ResNet s3.4): the same base view at several shorter sides
      (DataConfig.multi_scale_test_sizes), posteriors averaged over everything.
    - 144-crop (GoogLeNet s7): shorter side 256, 288, 320 and 352 (for a 224 crop; scaled in
      proportion for other crop sizes); the left, centre and right squares (top, middle,
      bottom for portrait images); in each, the four corner and the centre crop_size crops and
      the square resized to crop_size; and the reflections of all: 4 x 3 x 6 x 2 = 144 views.
      Refused for crops under MIN_144_CROP_SIZE.

    Deviations and gaps: plain `multi-scale` takes one centre crop per scale (the papers pair
    multi-scale with dense or multi-crop evaluation); VGG's 150-crop "multi-crop" (a 5 x 5
    grid with flips at three scales) is not implemented.
    """

    def __init__(
        self, protocol: Protocol, preprocess: EvalPreprocess, scales: tuple[int, ...] = ()
    ) -> None:
        self.protocol, self.preprocess = protocol, preprocess
        self.scales = (scales or preprocess.scales) if protocol.multi_scale else ()
        if protocol.base == "144-crop":
            _check_144_crop(preprocess.crop_size)
            ratio = preprocess.crop_size / 224
            self.scales = scales or tuple(round(s * ratio) for s in GOOGLENET_SCALES)
        self.scales = self.scales or (preprocess.resize_size,)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        stacks = []
        size = self.preprocess.crop_size
        for scale in self.scales:
            if self.protocol.base == "center":  # the float work on the crop alone
                stacks.append(self.preprocess.center(image, scale).unsqueeze(0))
                continue
            scaled = self.preprocess(image, scale)
            if self.protocol.base == "ten-crop":
                stacks.append(ten_crop(scaled, size))
            elif self.protocol.base == "144-crop":
                stacks.append(googlenet_crops(scaled, size, self.preprocess.interpolation))
            else:
                stacks.append(dense_view(scaled))
        return stacks


def _check_144_crop(crop_size: int) -> None:
    if crop_size < MIN_144_CROP_SIZE:
        raise ConfigError(
            f"protocol '144-crop' is GoogLeNet's for 224 px crops; with {crop_size} px crops "
            f"(under {MIN_144_CROP_SIZE}) its views are near-copies: use center, ten-crop or dense"
        )


def collate_views(items: list) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """Batch of (stacks, label) items -> (list of per-image stacks, labels); items of
    undecodable files (None) are dropped. Stacks are not merged here because dense views
    differ in size between images; the scorer groups equal shapes."""
    good = [item for item in items if item is not None]
    if not good:
        return [], torch.empty(0, dtype=torch.long)
    return [stacks for stacks, _ in good], default_collate([label for _, label in good])
