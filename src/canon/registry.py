"""One registry for everything canon builds by name: models now, recipes later.

A name is registered once; registering it again is an error, because two builders answering to
one name would make results depend on import order.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from canon.errors import CanonError, ConfigError

if TYPE_CHECKING:
    import torch.nn as nn

Builder = TypeVar("Builder", bound=Callable[..., Any])


class UnknownNameError(CanonError, LookupError):
    """A name that no registry entry answers to; the message lists close matches."""


@dataclass(frozen=True)
class Entry:
    name: str
    builder: Callable[..., Any]
    description: str


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(
        self, name: str | None = None, *, description: str | None = None
    ) -> Callable[[Builder], Builder]:
        """Decorator: register a builder under `name` (default: the function's name)."""

        def decorate(builder: Builder) -> Builder:
            key = name or builder.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            text = description
            if text is None:
                lines = (builder.__doc__ or "").strip().splitlines()
                text = lines[0] if lines else ""
            self._entries[key] = Entry(key, builder, text)
            return builder

        return decorate

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint} (`canon {self.kind}s` lists them all)"
            ) from None

    def names(self, pattern: str | None = None) -> list[str]:
        names = sorted(self._entries)
        return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names

    def __contains__(self, name: object) -> bool:
        return name in self._entries


MODELS = Registry("model")
register_model = MODELS.register


def _load_model_families() -> None:
    import canon.models  # noqa: F401  (importing registers every family)


def create_model(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Build the registered model `name` with a classifier of `num_classes` outputs.

    `None` keeps the family's own dataset: 1000 ImageNet classes, 10 for the CIFAR networks.
    """
    _load_model_families()
    entry = MODELS.get(name)
    if num_classes is None:
        return entry.builder(**kwargs)
    check_num_classes(num_classes)
    return entry.builder(num_classes=num_classes, **kwargs)


def check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; `pattern` is a shell-style filter such as 'resnet*'."""
    _load_model_families()
    return MODELS.names(pattern)


def describe_model(name: str) -> str:
    _load_model_families()
    return MODELS.get(name).description
