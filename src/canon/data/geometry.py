"""Image geometry shared by the training augmentation and the test-time views: resizing
(isotropic, as VGG s3.1 and ResNet s3.4 rescale the shorter side, then the central square for
AlexNet s2 and ZFNet s3) and the boxes and crops cut from an image (AlexNet s4.1's corner and
centre crops, VGG s3.2's 5 x 5 grid, CIFAR's padded crops, He et al. s4.2), on uint8 and float
images alike.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from canon.errors import ConfigError

INTERPOLATION = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    # The input pixel nearest each output pixel's centre, as PIL's; torchvision's NEAREST
    # takes the one left of it (OpenCV's), moving the picture by half an output pixel.
    "nearest": InterpolationMode.NEAREST_EXACT,
}


def resize_image(image: torch.Tensor, height: int, width: int, interpolation: str) -> torch.Tensor:
    """`image` (C x H x W or N x C x H x W, uint8 or float) resized to height x width;
    bilinear and bicubic antialiased when shrinking. "area" is a box filter: each output pixel
    the mean of the input pixels its cell covers (F.interpolate's "area", adaptive average
    pooling; TensorFlow's and OpenCV's area resize when shrinking), which no torchvision
    tensor mode offers; when enlarging it repeats pixels, nearly nearest-neighbour."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    if interpolation == "area":
        return _area_resize(image, height, width)
    antialias = interpolation != "nearest"
    return TF.resize(image, [height, width], INTERPOLATION[interpolation], antialias=antialias)


def _area_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """F.interpolate's "area" (adaptive average pooling), computed as two separable passes
    of box_taps: several times faster on a CPU when enlarging, where pooling is slowest.
    The passes sum and one division makes the mean, as pooling does: exact sums of uint8
    pixels give pooling's rounding, ties included."""
    sums = resample_window(image.float(), height, width, (0, 0, height, width), box_taps)
    counts = _box_counts(image.shape[-2], height)[:, None] * _box_counts(image.shape[-1], width)
    resized = sums / counts.to(sums.device)
    if image.dtype == torch.uint8:
        resized = resized.round_().clamp_(0, 255).to(torch.uint8)
    return resized


def fit_image(image: torch.Tensor, size: int, fit: str, interpolation: str) -> torch.Tensor:
    """The image rescaled before any crop (DataConfig.image_fit): "shorter", the shorter side
    to `size`, aspect ratio kept (VGG s3.2, ResNet s3.4); "center-square", that and then the
    central size x size square (AlexNet s2, ZFNet s3); "squash", the whole image to size x
    size, aspect ratio ignored (DataConfig.alexnet_resize)."""
    if fit == "squash":
        return resize_image(image, size, size, interpolation)
    height, width = shorter_side_size(*image.shape[-2:], size)
    image = resize_image(image, height, width, interpolation)
    if fit == "center-square":
        return crop_box(image, *center_box(height, width, size), size)
    return image


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Height and width after an isotropic rescale that makes the shorter side `size`, the
    longer truncated to whole pixels as torchvision's Resize(size) does (its weights' published
    accuracy was measured so)."""
    if height <= width:
        return size, max(size, int(width * size / height))
    return max(size, int(height * size / width)), size


def check_crop(height: int, width: int, size: int) -> None:
    """Refuse size x size crops of a smaller image."""
    if min(height, width) < size:
        raise ConfigError(f"cannot take {size}x{size} crops of a {height}x{width} image")


def center_box(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of the centred size x size window of a height x width image, an odd margin
    split as torchvision's CenterCrop splits it (Python's round: half to even)."""
    check_crop(height, width, size)
    return round((height - size) / 2), round((width - size) / 2)


def five_crop_boxes(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """(top, left) of the top-left, top-right, bottom-left, bottom-right and centre windows
    (AlexNet s4.1's test crops, Zeiler & Fergus s3's training crops)."""
    top, left = center_box(height, width, size)
    bottom, right = height - size, width - size
    return [(0, 0), (0, right), (bottom, 0), (bottom, right), (top, left)]


def grid_boxes(height: int, width: int, size: int, count: int) -> list[tuple[int, int]]:
    """(top, left) of count x count size x size windows on a regular grid, row by row, the
    first and last at the image's edges (VGG s3.2's "5 x 5 regular grid"); the middle one of
    an odd grid is the centre window."""
    check_crop(height, width, size)
    tops = [row * (height - size) // (count - 1) for row in range(count)]
    lefts = [column * (width - size) // (count - 1) for column in range(count)]
    return [(top, left) for top in tops for left in lefts]


def crop_box(image: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    return image[..., top : top + size, left : left + size]


def overlap(
    top: int, left: int, size: int, height: int, width: int
) -> tuple[tuple[int, int, int, int], list[int]]:
    """A size x size window at (top, left), which may overhang a height x width image: the
    part inside as (top, left, rows, columns), and the zero padding that completes it
    ([left, right, top, bottom], F.pad's order). A window wholly in the padding (padding
    wider than the crop) has nothing inside and is all padding."""
    rows_at, rows, pad_top = _overlap_1d(top, size, height)
    columns_at, columns, pad_left = _overlap_1d(left, size, width)
    inside = (rows_at, columns_at, rows, columns)
    return inside, [pad_left, size - columns - pad_left, pad_top, size - rows - pad_top]


def _overlap_1d(start: int, size: int, length: int) -> tuple[int, int, int]:
    """Where [start, start + size) meets [0, length): (its first index inside, how many are
    inside, how many come before it)."""
    first = min(max(start, 0), length)
    end = max(min(start + size, length), first)
    return first, end - first, min(max(first - start, 0), size)


def cut(image: torch.Tensor, inside: tuple[int, int, int, int]) -> torch.Tensor:
    top, left, rows, columns = inside
    return image[..., top : top + rows, left : left + columns]


# Scale jitter meets a few thousand (source, target) pairs per set; an entry is under 10 KB
# when enlarging, up to about 70 KB when shrinking a 4,000 px photo.
@functools.lru_cache(maxsize=4096)
def resampling_taps(source: int, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and weights (target x taps) of every output when `source` samples are
    resampled to `target`: torch's antialiased bilinear filter (a triangle, widened by the
    scale when shrinking), computed in float32 as torch does, so resampling through them
    matches TF.resize(..., antialias=True) to float rounding. Taps no output uses are dropped.
    Shared by every caller: read, never write."""
    scale = torch.tensor(source / target, dtype=torch.float32)
    support = scale.clamp(min=1.0)
    centers = (torch.arange(target, dtype=torch.float32) + 0.5) * scale
    first = (centers - support + 0.5).long().clamp(min=0)
    index = first[:, None] + torch.arange(math.ceil(2 * float(support)) + 1)
    weight = (1 - ((index - centers[:, None] + 0.5) / support).abs()).clamp(min=0)
    weight[index >= source] = 0
    used = weight.amax(0) > 0
    weight = weight[:, used]
    index = index[:, used].clamp(max=source - 1).to(torch.int32)
    return index, weight / weight.sum(1, keepdim=True)


@functools.lru_cache(maxsize=4096)
def box_taps(source: int, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and 0/1 weights (target x taps) of adaptive average pooling's cells
    from `source` to `target` samples (F.interpolate's "area"): output i sums the samples
    floor(i * source / target) .. ceil((i + 1) * source / target) - 1. Read, never write."""
    outputs = torch.arange(target)
    first = outputs * source // target
    count = ((outputs + 1) * source + target - 1) // target - first
    index = first[:, None] + torch.arange(int(count.max()))
    weight = (index < (first + count)[:, None]).float()
    return index.clamp(max=source - 1).to(torch.int32), weight


def _box_counts(source: int, target: int) -> torch.Tensor:
    """How many samples each output's cell sums (box_taps; 1 each when the size stays)."""
    return box_taps(source, target)[1].sum(1) if source != target else torch.ones(target)


Taps = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def resample_rows(
    image: torch.Tensor, target: int, start: int, count: int, taps: Taps = resampling_taps
) -> torch.Tensor:
    """Rows start .. start + count - 1 of `image` (float ... x H x W) resampled to `target`
    rows through `taps` (default: as TF.resize(..., antialias=True) computes them), without
    the others."""
    if image.shape[-2] == target:
        return image[..., start : start + count, :]
    index, weight = taps(image.shape[-2], target)
    index = index[start : start + count].to(image.device)
    weight = weight[start : start + count].to(image.device)
    rows = image.index_select(-2, index[:, 0]) * weight[:, 0, None]
    for tap in range(1, index.shape[1]):  # a weighted sum of whole rows: contiguous copies
        rows.addcmul_(image.index_select(-2, index[:, tap]), weight[:, tap, None])
    return rows


def resample_window(
    image: torch.Tensor, height: int, width: int, inside: tuple[int, int, int, int],
    taps: Taps = resampling_taps,
) -> torch.Tensor:
    """The window `inside` = (top, left, rows, columns) of `image` (float ... x H x W) as
    resized to height x width through `taps` (default: TF.resize(..., antialias=True)),
    computing only the window: rows first, then the window's columns."""
    top, left, rows, columns = inside
    window = resample_rows(image, height, top, rows, taps).transpose(-1, -2).contiguous()
    return resample_rows(window, width, left, columns, taps).transpose(-1, -2)
