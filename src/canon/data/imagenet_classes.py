"""ImageNet-1k's class index: its 1000 WordNet ids in the standard order, and their names."""

from __future__ import annotations

import functools
from pathlib import Path

WNIDS_FILE = Path(__file__).with_name("imagenet_wnids.txt")


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k (ILSVRC-2012) WordNet ids in the standard class index order (sorted),
    the order of torchvision's categories: index 0 is n01440764 (tench)."""
    return tuple(WNIDS_FILE.read_text().split())


@functools.cache
def imagenet_names() -> dict[str, str]:
    """wnid -> the class's name as torchvision's ImageNet weights give it ("tench", "church";
    their metadata, nothing downloaded)."""
    from torchvision.models import AlexNet_Weights

    categories = AlexNet_Weights.IMAGENET1K_V1.meta["categories"]
    return dict(zip(imagenet_wnids(), categories, strict=True))
