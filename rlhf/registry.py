"""Name -> object registries, so users pick reward functions, estimators and aggregations by name."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from rlhf.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of implementations; unknown names fail with the closest valid ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}.{hint} Valid: {', '.join(sorted(self._items))}.")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
