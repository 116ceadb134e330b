"""Small real training sets for the tests: evenly spread slices of the bundled CIFAR-10 sample."""

from __future__ import annotations

import torch

from canon.data import ArrayImages, Datasets


def spread_subset(dataset: ArrayImages, count: int) -> ArrayImages:
    """`count` images spread over the whole set (so every class appears), same transform."""
    index = torch.linspace(0, len(dataset) - 1, count).long()
    return ArrayImages(
        dataset.images[index], [dataset.labels[i] for i in index.tolist()], dataset.classes,
        name=f"{dataset.name}[{count}]", transform=dataset.transform,
    )


def spread_subsets(sets: Datasets, train_count: int, val_count: int) -> Datasets:
    return Datasets(spread_subset(sets.train, train_count), spread_subset(sets.val, val_count),
                    sets.preprocess)
