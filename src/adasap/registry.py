"""One registry class for every extension kind: criteria, corruptions, models, datasets, tasks.

A registry maps names to entries, rejects a second entry under a name it holds, and answers
an unknown name with one line that lists the registered ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from adasap.errors import UserError, quote

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name. ``kind`` names them in messages ("task", "criterion", ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` as ``name``; a name registered already is a programming error."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered already")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """``@registry.register("name")``: :meth:`add` as a decorator."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str) -> T:
        """The entry ``name``; an unknown name is a :class:`UserError` listing the known ones."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UserError(
                f"unknown {self.kind} {quote(name)}: choose one of {', '.join(self._entries)}"
            ) from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
