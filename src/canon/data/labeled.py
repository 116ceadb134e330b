"""The base of canon's datasets, `LabeledImages` (items `(transform(image), label)`, `image` a
decoded uint8 tensor 3 x H x W, RGB), `ArrayImages`, images held in memory (CIFAR, He et al.
s4.2, and the bundled sample), and `ImageSubset`, some images of another set.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from canon.errors import DataError

Transform = Callable[[torch.Tensor], object]


class LabeledImages(Dataset):
    """Base: `classes`, `class_ids`, `labels`, `load_image(i)` (uint8 3 x H x W) and a settable
    transform (default: none, the item is the decoded image). An item is None where the image
    could not be decoded; canon.data.loaders.collate drops it."""

    # Human names where known (FolderImages: from a synset mapping file beside the tree, else
    # torchvision's for ImageNet wnids), else the class_ids.
    classes: list[str]
    # What labels index, by name: folder names (ImageNet wnids) or, for arrays, the classes.
    # A trained model keeps them, so an evaluation split's labels can be matched to its outputs.
    class_ids: list[str]
    labels: list[int]
    # Image files of this set left out when it was listed (FolderImages: empty, missing), so
    # that a count of skipped images can include them beside the undecodable ones.
    skipped_at_listing = 0

    def __init__(self, transform: Transform | None = None) -> None:
        self.transform = transform

    def load_image(self, index: int) -> torch.Tensor | None:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.load_image(index)
        if image is None:
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]

    def with_transform(self, transform: Transform | None) -> LabeledImages:
        """A shallow copy sharing the images, with another transform."""
        clone = copy.copy(self)
        clone.transform = transform
        return clone


class ArrayImages(LabeledImages):
    """Images held in memory as one uint8 tensor N x 3 x H x W (CIFAR, the bundled sample)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: list[int],
        classes: list[str],
        *,
        name: str,
        transform: Transform | None = None,
    ) -> None:
        super().__init__(transform)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise DataError(f"{name}: expected uint8 images N x 3 x H x W, got {images.shape}")
        if len(images) != len(labels):
            raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
        if labels and not 0 <= min(labels) <= max(labels) < len(classes):
            raise DataError(f"{name}: labels outside 0..{len(classes) - 1}")
        self.images = images
        self.labels = labels
        self.classes = self.class_ids = classes
        self.name = name

    def load_image(self, index: int) -> torch.Tensor:
        return self.images[index]

    def __repr__(self) -> str:
        return f"ArrayImages({self.name}, {len(self)} images, {len(self.classes)} classes)"


class ImageSubset(LabeledImages):
    """The images of `parent` at `indices`, in that order, with its classes (the two parts of
    a training split that data.val_split divides, canon.data.holdout)."""

    def __init__(
        self, parent: LabeledImages, indices: list[int], transform: Transform | None = None
    ) -> None:
        super().__init__(transform)
        self.parent, self.indices = parent, list(indices)
        self.labels = [parent.labels[i] for i in self.indices]
        self.classes, self.class_ids = parent.classes, parent.class_ids

    def load_image(self, index: int) -> torch.Tensor | None:
        return self.parent.load_image(self.indices[index])

    def __repr__(self) -> str:
        return f"ImageSubset({self.parent!r}, {len(self)} images)"
