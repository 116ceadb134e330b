"""Test-time views: the crops, or whole images, a protocol feeds the network per image (AlexNet
s4.1, ZFNet s3, VGG s3.2, GoogLeNet s7, ResNet s3.4). `ProtocolViews` turns one raw uint8 image
into a list of view stacks, one per method and scale, each V x 3 x h x w, and `collate_views`
batches them for the DataLoader; scoring lives in canon.evaluation.protocols.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.utils.data.dataloader import default_collate

from canon.data.geometry import check_crop, crop_box, five_crop_boxes, grid_boxes, resize_image
from canon.data.preprocess import EvalPreprocess
from canon.errors import ConfigError

BASE_VIEWS = ("center", "ten-crop", "dense", "144-crop", "multi-crop")
VIEWS_PER_SCALE = {"center": 1, "ten-crop": 10, "dense": 2, "144-crop": 36, "multi-crop": 50}
GOOGLENET_SCALES = (256, 288, 320, 352)  # s7, for 224 x 224 crops
VGG_GRID = 5  # VGG s3.2: "50 crops per scale (5 x 5 regular grid with 2 flips)"
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
    "multi-crop",
    "multi-crop+dense",
)


@dataclass(frozen=True)
class Protocol:
    name: str
    # Each one of BASE_VIEWS. Posteriors are averaged over each method's views, then over the
    # methods (canon.evaluation.protocols).
    methods: tuple[str, ...]
    multi_scale: bool

    @property
    def dense(self) -> bool:
        return "dense" in self.methods


def _check_scales(protocol: Protocol, preprocess: EvalPreprocess, scales: tuple[int, ...]
                  ) -> None:
    """Refuse given test scales a protocol would ignore; for a multi-scale protocol, refuse
    having no scales, and scales (given, or the preprocessing's) too small for its crops."""
    if scales and not (protocol.multi_scale or protocol.methods == ("144-crop",)):
        raise ConfigError(f"scales {tuple(scales)} apply to the multi-scale protocols and "
                          f"144-crop; {protocol.name} evaluates at resize_size "
                          f"({preprocess.resize_size})")
    if not protocol.multi_scale and not scales:  # 144-crop's own scales fit its crops
        return
    used = tuple(scales or preprocess.scales)
    if not used:
        raise ConfigError(f"{protocol.name} needs test scales: pass scales (canon eval "
                          "--scales), or set data.test_scales in the recipe")
    if protocol.methods != ("dense",) and min(used) < preprocess.crop_size:
        where = "" if scales else " (the recipe's data.test_scales)"
        raise ConfigError(f"scales {used}{where}: a shorter side under the crop size "
                          f"{preprocess.crop_size} has no {protocol.name} crops")


def parse_protocol(name: str) -> Protocol:
    """`center`, `ten-crop`, `dense`, `144-crop`, `multi-crop`, `multi-scale`,
    `multi-scale+<base>`, `multi-crop+dense` (parts in any order), as written in `canon eval
    --protocol`; plain `multi-scale` means multi-scale+center. 144-crop and multi-crop (and
    so multi-crop+dense) come with their scales: a `multi-scale` part changes nothing."""
    parts = [p.strip() for p in name.split("+")]
    if len(set(parts)) < len(parts):
        raise ConfigError(f"protocol {name!r} names a part twice; choose from "
                          f"{', '.join(PROTOCOLS)}")
    multi = "multi-scale" in parts
    rest = [p for p in parts if p != "multi-scale"]
    if sorted(rest) == ["dense", "multi-crop"] and len(parts) - len(rest) <= 1:
        return Protocol("multi-crop+dense", ("multi-crop", "dense"), True)
    if len(parts) > 2 or len(rest) > 1 or (rest and rest[0] not in BASE_VIEWS):
        raise ConfigError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    base = rest[0] if rest else "center"
    if base == "144-crop":  # GoogLeNet's own scales (ProtocolViews)
        return Protocol(base, (base,), False)
    if base == "multi-crop":  # VGG's: "150 crops over 3 scales"
        return Protocol(base, (base,), True)
    label = f"multi-scale+{base}" if multi else base
    return Protocol(label, (base,), multi)


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


def grid_crops(image: torch.Tensor, size: int, count: int = VGG_GRID) -> torch.Tensor:
    """2 count^2 x C x size x size: the crops on a count x count regular grid (geometry.
    grid_boxes), row by row, then their reflections (VGG s3.2's multi-crop at one scale)."""
    boxes = grid_boxes(*image.shape[-2:], size, count)
    crops = torch.stack([crop_box(image, top, left, size) for top, left in boxes])
    return torch.cat([crops, crops.flip(-1)])


def dense_view(image: torch.Tensor) -> torch.Tensor:
    """2 x C x H x W: the whole image and its reflection (VGG s3.2)."""
    return torch.stack([image, image.flip(-1)])


class ProtocolViews:
    """Raw uint8 image -> list of normalised view stacks V x 3 x h x w, one per method and
    scale: every scale of the protocol's first method, then of its second.

    - center: one crop_size centre crop of the image rescaled to resize_size.
    - ten-crop (AlexNet s4.1): the four corner crops and the centre crop, and their reflections
      (for AlexNet, s2, and ZFNet, s3, of the image's central resize_size square,
      EvalPreprocess.fit).
    - dense (VGG s3.2): the whole rescaled image through the fully convolutional network, the
      class score map spatially averaged; plus the horizontal reflection.
    - multi-scale (VGG s3.2/s4.2, ResNet s3.4): the same base view at several shorter sides
      (DataConfig.multi_scale_test_sizes), posteriors averaged over everything.
    - multi-crop (VGG s3.2): "50 crops per scale (5 x 5 regular grid with 2 flips), for a
      total of 150 crops over 3 scales": the crop_size crops at the corners and on a regular
      grid between them, and their reflections, at each multi-scale test size.
    - multi-crop+dense (VGG s4.3, Table 5, its best single-net result): both at the same
      scales, combined by "averaging their soft-max outputs", "their" being the two
      techniques': the mean of the two methods' posteriors, each averaged over its own views
      (150 crops, 6 dense views). The paper gives no formula; weighting all 156 views alike
      would all but drop the dense half.
    - 144-crop (GoogLeNet s7): shorter side 256, 288, 320 and 352 (for a 224 crop; scaled in
      proportion for other crop sizes); the left, centre and right squares (top, middle,
      bottom for portrait images); in each, the four corner and the centre crop_size crops and
      the square resized to crop_size; and the reflections of all: 4 x 3 x 6 x 2 = 144 views.
      Refused for crops under MIN_144_CROP_SIZE.

    Deviation: plain `multi-scale` takes one centre crop per scale (the papers pair
    multi-scale with dense or multi-crop evaluation).
    """

    def __init__(
        self, protocol: Protocol, preprocess: EvalPreprocess, scales: tuple[int, ...] = ()
    ) -> None:
        self.protocol, self.preprocess = protocol, preprocess
        _check_scales(protocol, preprocess, scales)
        self.scales = tuple(scales or preprocess.scales) if protocol.multi_scale else ()
        # VGG's rule (DataConfig.multi_scale_test_sizes) left out a side under the crop.
        size, by_rule = preprocess.resize_size, not (scales or preprocess.scales_named)
        if protocol.multi_scale and by_rule and self.scales == (size, size + 32):
            warnings.warn(
                f"{protocol.name} at 2 scales, shorter side {size} and {size + 32}, not VGG's 3: "
                f"{size - 32} is under the {preprocess.crop_size} px crop (data.test_scales "
                "names others)", stacklevel=2)
        if "ten-crop" in protocol.methods and not protocol.multi_scale:
            _warn_if_no_margin(preprocess)
        if protocol.methods == ("144-crop",):
            _check_144_crop(preprocess)
            ratio = preprocess.crop_size / 224
            self.scales = scales or tuple(round(s * ratio) for s in GOOGLENET_SCALES)
        self.scales = self.scales or (preprocess.resize_size,)  # the single-scale protocols

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        methods = self.protocol.methods
        stacks: dict[str, list[torch.Tensor]] = {method: [] for method in methods}
        for scale in self.scales:
            if methods == ("center",):  # the float work on the crop alone
                stacks["center"].append(self.preprocess.center(image, scale).unsqueeze(0))
                continue
            scaled = self.preprocess(image, scale)  # once for every method at this scale
            for method in methods:
                stacks[method].append(self._views(method, scaled))
        return [stack for method in methods for stack in stacks[method]]

    def _views(self, method: str, scaled: torch.Tensor) -> torch.Tensor:
        size = self.preprocess.crop_size
        if method == "ten-crop":
            return ten_crop(scaled, size)
        if method == "144-crop":
            return googlenet_crops(scaled, size, self.preprocess.interpolation)
        if method == "multi-crop":
            return grid_crops(scaled, size)
        return dense_view(scaled)


def _warn_if_no_margin(preprocess: EvalPreprocess) -> None:
    """AlexNet's ten crops are 224 of 256: crops as large as the rescaled image coincide."""
    if preprocess.resize_size <= preprocess.crop_size:
        warnings.warn(
            f"ten-crop of {preprocess.crop_size} px crops from images rescaled to "
            f"{preprocess.resize_size}: the five crops of a square image are one, so it "
            "scores the centre crop and its reflection (2 distinct views, not 10)", stacklevel=3)


def _check_144_crop(preprocess: EvalPreprocess) -> None:
    crop_size = preprocess.crop_size
    if crop_size < MIN_144_CROP_SIZE:
        raise ConfigError(
            f"protocol '144-crop' is GoogLeNet's for 224 px crops; with {crop_size} px crops "
            f"(under {MIN_144_CROP_SIZE}) its views are near-copies: use center, ten-crop or dense"
        )
    if preprocess.fit != "shorter":
        warnings.warn(
            f"144-crop of images fitted by {preprocess.fit!r}: every rescaled image is a square, "
            "so its left, centre and right squares are one (48 distinct views, not 144)",
            stacklevel=3)


def collate_views(items: list) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """Batch of (stacks, label) items -> (list of per-image stacks, labels); items of
    undecodable files (None) are dropped. Stacks are not merged here because dense views
    differ in size between images; the scorer groups equal shapes."""
    good = [item for item in items if item is not None]
    if not good:
        return [], torch.empty(0, dtype=torch.long)
    return [stacks for stacks, _ in good], default_collate([label for _, label in good])
