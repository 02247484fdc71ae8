"""One generic name -> object registry (teacher back-ends and aliases, loss terms, eval tasks, student presets).

Why one class: timm and torchdistill each copy registry code several times and let duplicates silently
overwrite; here a duplicate raises and an unknown name suggests near matches.
Why here, in the bottom room: every room needs it, and `teachers` imports none of the others.
Why entry points: they are how Python packages extend each other. A registry given `entry_point_group` also
finds objects that other installed packages declare, e.g. in their pyproject.toml

    [project.entry-points."biomed_distill.teachers"]
    medclip = "medclip_plugin:load"

and loads each one only when its name is first asked for, so a broken plug-in breaks only its own name.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.metadata
import re
import warnings
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


class PluginLoadError(ImportError):
    """An installed package's entry point named a registry entry but could not be imported."""


class Registry(Generic[T]):
    """A named collection of objects, filled by a decorator usable bare or as `@reg.register(key=...)`.

    With `entry_point_group`, names declared by installed packages in that group are listed and loaded lazily
    (`importlib.metadata.entry_points`); a name registered in code wins over a plug-in of the same name.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._warned: set[str] = set()
        self._loaded: set[str] = set()  # names that came from entry points

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

    # -- plug-ins ------------------------------------------------------------------------------------
    def _entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        """The group's entry points not shadowed by a name registered in code (read afresh: cheap, and only
        consulted for names not registered in code)."""
        if not self.entry_point_group:
            return {}
        found: dict[str, importlib.metadata.EntryPoint] = {}
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            if ep.name in self._loaded:
                continue
            if ep.name in self._items:
                if ep.name not in self._warned:
                    self._warned.add(ep.name)
                    warnings.warn(
                        f"entry point {ep.name!r} = {ep.value!r} in group {self.entry_point_group!r} is "
                        f"ignored: a built-in {self.kind} has that name; rename it in the plug-in's "
                        "pyproject.toml",
                        stacklevel=3,
                    )
                continue
            found.setdefault(ep.name, ep)
        return found

    def _load_plugin(self, name: str) -> T | None:
        ep = self._entry_points().get(name)
        if ep is None:
            return None
        try:
            obj = ep.load()
        except Exception as e:  # the plug-in's own import error, named with where it was declared
            raise PluginLoadError(
                f"{self.kind} {name!r}: cannot load entry point {ep.value!r} (group "
                f"{self.entry_point_group!r}): {type(e).__name__}: {e}; fix or uninstall the "
                "package that declares it"
            ) from e
        self._items[name] = obj
        self._loaded.add(name)
        return obj

    def plugin_names(self) -> list[str]:
        """Names offered by installed packages' entry points and not yet loaded."""
        return sorted(self._entry_points(), key=_natural_key)

    # -- lookup --------------------------------------------------------------------------------------
    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        obj = self._load_plugin(name)
        if obj is not None:
            return obj
        known = self.list()
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(known) or 'none'})")

    def list(self, pattern: str = "*") -> list[str]:
        names = set(self._items) | set(self._entry_points())
        return sorted((n for n in names if fnmatch.fnmatch(n, pattern)), key=_natural_key)

    def __contains__(self, name: object) -> bool:
        return name in self._items or (isinstance(name, str) and name in self._entry_points())

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self.list())
