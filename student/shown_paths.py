"""Paths and SPECs as shipped documents show them (eval reports, model cards, progress bars).

Why: a report or a card travels with its folder; the absolute path of the machine that made it means nothing to
a reader and tells them the maker's user name and folder layout. A path is shown relative to the folder holding
the document when it lies within `MAX_UP` levels above it (`../student`), else by its name alone
(`pneumoniamnist.npz`). Hub ids, open_clip tags and aliases are not paths and are shown as given.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_UP = 2  # `../../x` is still a path a reader can follow from the document's folder; further up, the name only
PATH_PREFIXES = ("local-dir:", "hf:", "hf-clip:")  # SPEC forms whose target can be a folder


def shown_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """`path` relative to folder `base` (both resolved against the working directory), or its name alone when
    `base` is None or the relative path climbs more than MAX_UP levels."""
    text = os.path.expanduser(os.fspath(path))
    full = os.path.abspath(text)
    name = os.path.basename(full.rstrip(os.sep)) or full
    if base is None:
        return name
    try:
        rel = os.path.relpath(full, os.path.abspath(os.fspath(base)))
    except ValueError:  # another drive (Windows)
        return name
    parts = Path(rel).parts
    return rel if parts.count(os.pardir) <= MAX_UP else name


def _is_path(target: str) -> bool:
    return os.path.isabs(os.path.expanduser(target)) or target.startswith((".", "~")) or os.path.exists(target)


def shown_spec(spec: str, base: str | os.PathLike | None = None) -> str:
    """A model SPEC with its folder (if it names one) shown as `shown_path` does; other SPECs unchanged."""
    for prefix in PATH_PREFIXES:
        if spec.startswith(prefix):
            target = spec[len(prefix) :]
            return prefix + shown_path(target, base) if target and _is_path(target) else spec
    return shown_if_absolute(spec, base)


def shown_if_absolute(text: str, base: str | os.PathLike | None = None) -> str:
    """An absolute (or ~) path shown as `shown_path` does; anything else (a relative path, a URL, a hub id, a
    `pipe:` command) as written."""
    return shown_path(text, base) if os.path.isabs(os.path.expanduser(text)) else text
