"""A validation set carved from the training split (DataConfig.val_split): He et al. (2015)
s4.2 set their CIFAR schedule "on a 45k/5k train/val split" and report the test error of the
model trained on it; the papers' ImageNet validation sets are held-out sets of their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from canon.data.labeled import ImageSubset, LabeledImages
from canon.errors import ConfigError


def hold_out(
    dataset: LabeledImages, count: int, seed: int
) -> tuple[ImageSubset, ImageSubset]:
    """(the rest, `count` held-out images) of `dataset`, stratified: each class gives its
    share of `count` (largest remainders, ties to the lower class), its images drawn at random
    from a generator seeded by `seed` alone, so the same seed holds out the same images."""
    if not 0 < count < len(dataset):
        raise ConfigError(
            f"data.val_split must hold out between 1 and {len(dataset) - 1} of the "
            f"{len(dataset)} training images, got {count}"
        )
    rest, held = stratified_split(dataset.labels, count, seed)
    return ImageSubset(dataset, rest), ImageSubset(dataset, held)


def stratified_split(labels: Sequence[int], count: int, seed: int) -> tuple[list[int], list[int]]:
    """(the other indices, `count` held-out indices, sorted) of `labels`, as hold_out."""
    members: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        members.setdefault(label, []).append(index)
    classes = sorted(members)
    generator = torch.Generator().manual_seed(seed)
    held = []
    for label, share in zip(classes, _shares(count, [len(members[c]) for c in classes]),
                            strict=True):
        order = torch.randperm(len(members[label]), generator=generator)[:share]
        held.extend(members[label][i] for i in order.tolist())
    chosen = set(held)
    return [index for index in range(len(labels)) if index not in chosen], sorted(held)


def _shares(count: int, sizes: list[int]) -> list[int]:
    """`count` split in proportion to `sizes`: floors, then one more to the largest
    remainders."""
    total = sum(sizes)
    shares = [count * size // total for size in sizes]
    remainders = sorted(range(len(sizes)), key=lambda i: -(count * sizes[i] % total))
    for i in remainders[: count - sum(shares)]:
        shares[i] += 1
    return shares
