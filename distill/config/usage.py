"""`distill train --help`: every config key with its type, default and description, read from the models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from teachers.kernel.config_model import _strip, is_model, type_name

USAGE = """usage: distill train --config CONFIG.yaml [section.key=value ...]
       accelerate launch [accelerate options] -m distill.train --config CONFIG.yaml [section.key=value ...]

Train a student from a YAML config (configs/*.yaml); each section.key=value overrides one key, its value read
as YAML (train.max_steps=100, data.crop_scale=[0.5,1]). List items go by name, kind or index:
loss.terms.feature.weight=3, loss.terms.1.weight=3 (an empty loss.terms is first filled with the mode's terms).
The whole config is checked before any file is opened.
"""


def _rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str]]:
    rows = []
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        inner = _strip(f.annotation)
        if is_model(inner) and f.default_factory is not None:  # a section: list its keys
            rows += _rows(inner, key + ".")
            continue
        default = cast(Callable[[], Any], f.default_factory)() if f.default_factory is not None else f.default
        shown = (
            "(required)"
            if default is PydanticUndefined
            else repr(default.model_dump() if isinstance(default, BaseModel) else default)
        )
        rows.append((f"{key} = {shown}", type_name(f.annotation), f.description or ""))
        if is_model(inner):  # optional section (loss.routing)
            rows += _rows(inner, key + ".")
        elif get_origin(inner) is tuple and is_model(_strip(get_args(inner)[0])):  # list of sections (loss.terms)
            rows += _rows(_strip(get_args(inner)[0]), key + ".<name|kind|index>.")
    return rows


def config_help(model: Any) -> str:
    """USAGE plus one line per config key: `key = default   [type] description`."""
    rows = _rows(model, "")
    width = min(max(len(r[0]) for r in rows), 48)
    lines = [USAGE, "config keys (key = default   [type] description):"]
    for head, tp, desc in rows:
        pad = head.ljust(width) if len(head) <= width else head + "\n" + " " * (width + 2)
        lines.append(f"  {pad}   [{tp}] {desc}".rstrip())
    return "\n".join(lines) + "\n"
