"""Registries: builders by name (models, recipes), each name registered once, since two builders
answering to one name would make results depend on import order."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from canon.errors import CanonError

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
