"""One generic name -> object registry, shared by teachers, losses and tasks.

Why one class: timm and torchdistill each copy registry code several times and let duplicates
silently overwrite; here a duplicate raises and an unknown name suggests near matches.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


class Registry(Generic[T]):
    """A named collection of objects, filled by a decorator usable bare or as `@reg.register(key=...)`."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, obj: T | None = None, *, key: str | None = None):
        def _add(o: T) -> T:
            name = key or getattr(o, "__name__", None)
            if not name:
                raise ValueError(f"cannot register {o!r} as a {self.kind} without key=")
            self.add(name, o)
            return o

        return _add(obj) if obj is not None else _add

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise KeyError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._items), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.list()) or 'none'})"
            ) from None

    def list(self, pattern: str = "*") -> list[str]:
        return sorted((n for n in self._items if fnmatch.fnmatch(n, pattern)), key=_natural_key)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._items)
