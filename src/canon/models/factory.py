"""Models by name: `create_model("resnet50", num_classes=100)` builds any registered
architecture. The families register themselves in canon.models.base.MODELS when the
canon.models package is imported, which importing this module does first."""

from __future__ import annotations

import re
from typing import Any

import torch.nn as nn

from canon.errors import ConfigError
from canon.models.base import MODELS, check_num_classes


class ModelOptionError(ConfigError):
    """An option that a model's builder does not take."""


def create_model(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Build the registered model `name` with a classifier of `num_classes` outputs; `kwargs`
    are its builder's options (a ModelOptionError names any it does not take).

    `None` keeps the family's own dataset: 1000 ImageNet classes, 10 for the CIFAR networks.
    """
    entry = MODELS.get(name)
    if num_classes is not None:
        check_num_classes(num_classes)
        kwargs = {"num_classes": num_classes, **kwargs}
    try:
        return entry.builder(**kwargs)
    except TypeError as error:  # raised by whichever layer the option reaches
        option = re.search(r"(unexpected|multiple values for) keyword argument '(\w+)'",
                           str(error))
        if option is None or option[2] not in kwargs:
            raise
        problem = (f"takes no option {option[2]!r}" if option[1] == "unexpected"
                   else f"sets {option[2]!r} itself")  # the original says where, if a bug
        raise ModelOptionError(f"{name} {problem} ({error})") from error


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; `pattern` is a shell-style filter such as 'resnet*'."""
    return MODELS.names(pattern)


def describe_model(name: str) -> str:
    """The first line of the model builder's docstring."""
    return MODELS.get(name).description
