"""Package attributes imported on first use (PEP 562), so that `canon --help` and reading a
recipe do not wait for torch and torchvision to load."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports each name from its home module."""

    def __getattr__(name: str) -> Any:  # noqa: N807 (the name PEP 562 looks for)
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(homes[name]), name)

    return __getattr__
