"""In-memory training sets (CIFAR, the bundled sample) held on the training device as one uint8
tensor and augmented a batch at a time there: a few tensor ops per batch instead of a Python
call per image in loader processes, which on a small machine compete with the model for its
cores and on a GPU leave the device waiting for the host (the fastest CIFAR trainers work so).

The augmentation is CropFirst's for images already at the training size (He et al. s4.2:
normalise, zero-pad by 4 pixels, so the padding is the mean colour, a random 32 x 32 crop, a
random reflection; AlexNet's colour shift when asked): the same crops and the same output
distribution. Its random numbers are a hash of (seed, the sample's key `epoch * n + index`),
computed on the device: a sample's augmentation depends on nothing else (not the batch it
falls in, the accumulation, the number of processes or the device), so a resumed run draws
what the uninterrupted one drew, and a GPU what a CPU would. They differ from the per-image
pipeline's draws (torch's generator), not in distribution.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from canon.data.labeled import ArrayImages, ImageSubset, LabeledImages
from canon.data.normalize import Normalize
from canon.data.sampling import EpochKeys
from canon.data.transforms import CropFirst, FancyPCA, RandomCrop, RescaleShorter

_MASK32 = 0xFFFFFFFF


def _times(values: torch.Tensor, factor: int) -> torch.Tensor:
    """values x factor mod 2^32 for values in [0, 2^32), without overflowing int64."""
    low = values * (factor & 0xFFFF)
    high = (values * (factor >> 16)) & 0xFFFF
    return (low + (high << 16)) & _MASK32


def _hash32(values: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 values in [0, 2^32) (Wellons' lowbias32)."""
    values = values ^ (values >> 16)
    values = _times(values, 0x7FEB352D)
    values = values ^ (values >> 15)
    values = _times(values, 0x846CA68B)
    return values ^ (values >> 16)


def sample_bits(keys: torch.Tensor, seed: int, count: int) -> torch.Tensor:
    """`count` independent uniform 32-bit integers (int64, keys' device) per key: a function
    of (seed, key) alone."""
    state = _hash32(torch.full_like(keys, seed & _MASK32))
    state = _hash32(state ^ ((seed >> 32) & _MASK32))
    state = _hash32(state ^ (keys & _MASK32))
    state = _hash32(state ^ (keys >> 32))
    streams = _times(torch.arange(1, count + 1, device=keys.device), 0x9E3779B9)
    return _hash32(state[:, None] ^ streams)


def _uniform(bits: torch.Tensor) -> torch.Tensor:
    """(0, 1] doubles from uniform 32-bit integers (never 0: Box-Muller takes its log)."""
    return (bits.double() + 1) / 2.0**32


class BatchedCrop:
    """CropFirst on a batch of uint8 images B x 3 x H x W: to float, colour shift, normalise,
    zero-pad, crop size x size at a random place per image, reflect half of them. The output
    is channels_last in memory (the crop gathers pixels, channels innermost)."""

    def __init__(
        self, size: int, padding: int, normalize: Normalize, flip: bool = True,
        fancy_pca: FancyPCA | None = None,
    ) -> None:
        self.size, self.padding, self.flip, self.fancy_pca = size, padding, flip, fancy_pca
        self.normalize = normalize
        self._constants: dict[tuple, tuple] = {}

    def draws(self, keys: torch.Tensor, seed: int, height: int, width: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per key: the crop's top and left in the padded image, whether it is reflected, and
        the colour shift's alpha (3, N(0, alpha_std^2); None without colour shift)."""
        bits = sample_bits(keys, seed, 7)
        spans = (height + 2 * self.padding - self.size + 1,
                 width + 2 * self.padding - self.size + 1)
        tops, lefts = bits[:, 0] % spans[0], bits[:, 1] % spans[1]
        flips = (bits[:, 2] & 1).bool() & self.flip
        if self.fancy_pca is None:
            return tops, lefts, flips, None
        # Box-Muller: two pairs of uniforms make four normals, of which three are used.
        radius = (-2 * _uniform(bits[:, 3:5]).log()).sqrt()
        angle = 2 * torch.pi * _uniform(bits[:, 5:7])
        normals = torch.cat([radius * angle.cos(), radius * angle.sin()], dim=1)[:, :3]
        return tops, lefts, flips, (normals * self.fancy_pca.alpha_std).float()

    def __call__(self, images: torch.Tensor, keys: torch.Tensor, seed: int) -> torch.Tensor:
        count, _, height, width = images.shape
        device = images.device
        tops, lefts, flips, alpha = self.draws(keys.to(device), seed, height, width)
        mean, std, fancy_pca = self._on(device, height, width)
        batch = images.float().div_(255)
        if alpha is not None:
            batch += fancy_pca.shift(alpha).view(count, 3, 1, 1)
        batch -= mean
        if std is not None:
            batch /= std
        pad = self.padding
        if pad:
            batch = F.pad(batch, (pad, pad, pad, pad))
        steps = torch.arange(self.size, device=device)
        rows = tops[:, None] + steps
        columns = torch.where(flips[:, None], lefts[:, None] + self.size - 1 - steps,
                              lefts[:, None] + steps)
        picks = torch.arange(count, device=device)[:, None, None]
        crops = batch[picks, :, rows[:, :, None], columns[:, None, :]]  # B x size x size x 3
        return crops.permute(0, 3, 1, 2)

    def _on(self, device: torch.device, height: int, width: int
            ) -> tuple[torch.Tensor, torch.Tensor | None, FancyPCA | None]:
        """The mean at this size, the std and the colour shift's basis on `device`, copied
        there once: a copy from host memory each batch would wait for the GPU's queue."""
        key = (device, height, width)
        if key not in self._constants:
            std, pca = self.normalize.std, self.fancy_pca
            self._constants[key] = (
                self.normalize.mean_at(height, width).to(device),
                None if std is None else std.to(device),
                None if pca is None else pca.to(device))
        return self._constants[key]

    @classmethod
    def of(cls, transform: object, height: int, width: int) -> BatchedCrop | None:
        """The batched form of a training transform for height x width images, or None when
        it has none (a rescale that changes the size, another crop)."""
        if not isinstance(transform, CropFirst) or not isinstance(transform.crop, RandomCrop):
            return None
        rescale = transform.rescale
        if not (isinstance(rescale, RescaleShorter)
                and rescale.low == rescale.high == height == width):
            return None
        return cls(transform.crop.size, transform.crop.padding, transform.normalize,
                   transform.flip is not None, transform.fancy_pca)


def held_images(dataset: LabeledImages) -> torch.Tensor | None:
    """The uint8 images N x 3 x H x W of an in-memory set (or of a subset of one), else None."""
    if isinstance(dataset, ArrayImages):
        return dataset.images
    if isinstance(dataset, ImageSubset):
        parent = held_images(dataset.parent)
        return None if parent is None else parent[torch.tensor(dataset.indices)]
    return None


class DeviceBatches:
    """The training loader of an in-memory set: each epoch, the keys (`epoch * n + index`)
    set in `keys` before it, `batch_size` at a time (the last partial batch dropped), as
    (augmented images, labels) on `device`."""

    def __init__(
        self, images: torch.Tensor, labels: list[int], keys: EpochKeys, augment: BatchedCrop,
        batch_size: int, seed: int, device: torch.device | str,
    ) -> None:
        self.images = images.to(device)
        self.labels = torch.tensor(labels, dtype=torch.long, device=device)
        self.keys, self.augment, self.batch_size, self.seed = keys, augment, batch_size, seed
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.keys) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        keys = torch.tensor(self.keys.keys, dtype=torch.long, device=self.device)
        count = len(self.images)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = keys[start : start + self.batch_size]
            index = batch % count
            yield self.augment(self.images[index], batch, self.seed), self.labels[index]
