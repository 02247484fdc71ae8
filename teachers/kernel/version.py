"""The package version, from the installed distribution's metadata (pyproject.toml is the one place it is set).

Why here: the cache writes it into every file and the trainer and reports record it; the bottom room is the
one every other room may import. A source tree run without `pip install -e .` reads pyproject.toml instead.
"""

from __future__ import annotations

import importlib.metadata
import re
from functools import cache
from pathlib import Path

DISTRIBUTION = "biomed-distill"


@cache
def package_version() -> str:
    """`importlib.metadata.version("biomed-distill")`; for an uninstalled tree, pyproject.toml's, else "0+unknown"."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        m = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.MULTILINE)
    except OSError:
        m = None
    return m.group(1) if m else "0+unknown"
