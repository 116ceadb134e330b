"""Models by name: `create_model("resnet50", num_classes=100)` builds any registered
architecture. The families register themselves in canon.models.base.MODELS when the
canon.models package is imported, which importing this module does first."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from canon.models.base import MODELS, check_num_classes


def create_model(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Build the registered model `name` with a classifier of `num_classes` outputs.

    `None` keeps the family's own dataset: 1000 ImageNet classes, 10 for the CIFAR networks.
    """
    entry = MODELS.get(name)
    if num_classes is None:
        return entry.builder(**kwargs)
    check_num_classes(num_classes)
    return entry.builder(num_classes=num_classes, **kwargs)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; `pattern` is a shell-style filter such as 'resnet*'."""
    return MODELS.names(pattern)


def describe_model(name: str) -> str:
    """The first line of the model builder's docstring."""
    return MODELS.get(name).description
