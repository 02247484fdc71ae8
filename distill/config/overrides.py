"""`section.key=value` overrides applied to a config's plain dict before it is validated.

Each override is type-checked against its field at once, so the message names the override. List items are
addressed by index (`loss.terms.1.weight=3`) or by name: the item whose `name` is it, else whose `kind` is it
(`loss.terms.feature.weight=3`); two items of that kind are refused, naming them. An empty list with defaults
(loss.terms: the mode's terms) is filled with them first, so one default term can be changed alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, get_args, get_origin

import yaml
from pydantic import TypeAdapter, ValidationError

from teachers.kernel.bounded_yaml import load_yaml
from teachers.kernel.config_model import (
    ConfigError,
    _strip,
    config_error,
    field_type,
    is_model,
    type_name,
    unknown_key_message,
)

ListDefaults = Mapping[tuple, Callable[[], list]]
_NULLS = ("null", "~", "none")


def plain(x: Any) -> Any:
    """A deep copy made of dicts and lists only (tuples become lists)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def _is_text(tp: Any) -> bool:
    """A str (or optional str) field takes the raw text: `train.output_dir=123` is the folder '123'."""
    tp = _strip(tp)
    return tp is str


def _item_index(items: list, seg: str, item: str, here: str, rest: list[str], raw: str) -> int:
    """Which element of the list `here` the path segment `seg` means: an index, a name or a kind."""
    labels = [x.get("name") or x.get("kind") if isinstance(x, dict) else repr(x) for x in items]
    if seg.isdigit():
        i = int(seg)
        if i >= len(items):
            raise ConfigError(
                f"override {item!r}: {here} has {len(items)} items ({', '.join(map(str, labels))}); "
                f"there is no item {i}"
            )
        return i
    named = [i for i, x in enumerate(items) if isinstance(x, dict) and x.get("name") == seg]
    found = named or [i for i, x in enumerate(items) if isinstance(x, dict) and x.get("kind") == seg]
    if len(found) == 1:
        return found[0]
    tail = (".".join(rest) if rest else "") + "=" + raw
    if not found:
        raise ConfigError(
            f"override {item!r}: {here} has no item named or of kind {seg!r} (items: "
            f"{', '.join(f'{i}: {lb}' for i, lb in enumerate(labels)) or 'none'}); address one by "
            f"name, kind or index, e.g. {here}.0{'.' if rest else ''}{tail}"
        )
    raise ConfigError(
        f"override {item!r}: {len(found)} items of {here} have kind {seg!r} "
        f"({', '.join(f'{i}: {labels[i]}' for i in found)}); address one by index, e.g. "
        f"{here}.{found[0]}{'.' if rest else ''}{tail}"
    )


def apply_override(root: type, d: dict, item: str, list_defaults: ListDefaults | None = None) -> None:
    """Apply `a.b.c=value` to the plain dict `d` of the model `root`, checking the key path and the value's type."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.max_steps=100)")
    path = key.split(".")
    tp: Any = root
    node: Any = d
    slot: str | int
    for i, seg in enumerate(path):
        here, last = ".".join(path[:i]), i == len(path) - 1
        inner = _strip(tp)
        if is_model(inner):
            if seg not in inner.model_fields:
                raise ConfigError(f"override {item!r}: {unknown_key_message(seg, list(inner.model_fields), here)}")
            tp, slot = field_type(inner, seg), seg
        elif get_origin(inner) is tuple and get_args(inner)[1:] == (Ellipsis,):
            if not node and list_defaults and tuple(path[:i]) in list_defaults:
                node[:] = list_defaults[tuple(path[:i])]()
            tp, slot = get_args(inner)[0], _item_index(node, seg, item, here, path[i + 1 :], raw)
        elif get_origin(inner) is dict or inner is Any:
            tp, slot = (get_args(inner)[1] if inner is not Any else Any), seg
        else:
            raise ConfigError(f"override {item!r}: {here} is not a section ({type_name(tp)}), it has no key {seg!r}")
        if last:
            node[slot] = _parse(raw, tp, key, item)
            return
        child = node.get(slot) if isinstance(node, dict) else node[slot]
        if not isinstance(child, (dict, list)):
            child = [] if get_origin(_strip(tp)) is tuple else {}
            node[slot] = child
        node = child


def _parse(raw: str, tp: Any, key: str, item: str) -> Any:
    """The override's value: raw text for str fields, else YAML; checked against the field's type."""
    if _is_text(tp) and raw.strip().lower() not in _NULLS:
        return raw
    try:
        value = load_yaml(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {' '.join(str(e).split())}") from None
    if tp is not Any:
        try:
            TypeAdapter(tp).validate_python(value)
        except ValidationError as e:
            raise ConfigError(f"override {item!r}: {config_error(e, tp, key)}") from None
    return value


__all__ = ["apply_override", "plain", "ListDefaults"]
