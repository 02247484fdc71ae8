"""The one YAML loader of the project: `yaml.safe_load` with limits checked before anything is expanded.

Why: `safe_load` runs no code, but an alias bomb ("billion laughs": nine anchors, each a list of ten aliases of the
one before) composes into a few hundred nodes that stand for 10^9 values. PyYAML shares the aliased objects, so
the load itself is cheap; the first walk that copies or validates the result (`config_overrides.plain`, pydantic,
json) expands it and runs for minutes while memory grows without bound. Here the document is composed with a
count of the values it stands for once every alias is expanded, and refused at the first node over a limit, so
nothing is ever expanded. Every YAML the project reads (configs and `section.key=value` values, task files, corpus
recipes, benchmark variant and domain files) goes through `load_yaml`. It lives in `teachers`, the bottom room,
only so that every room may import it; it imports nothing but PyYAML (no torch).

Limits (per document; each refusal is a `YamlLimitError`, a `yaml.YAMLError`, naming the line):

- `MAX_YAML_BYTES` characters of text (2 MiB; the shipped configs are under 8 KB);
- `MAX_YAML_ALIASES` aliases (`*name`, 100);
- `MAX_YAML_DEPTH` levels of nesting (50);
- `MAX_YAML_VALUES` values once every alias is expanded (200,000); an alias inside the node it names (a cycle) is
  refused too.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.events import AliasEvent

MAX_YAML_BYTES = 2 << 20
MAX_YAML_ALIASES = 100
MAX_YAML_DEPTH = 50
MAX_YAML_VALUES = 200_000


class YamlLimitError(yaml.YAMLError):
    """A YAML document over one of the limits above; refused before any of it is expanded."""


def _where(mark) -> str:
    return f"line {mark.line + 1}: " if mark is not None else ""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer counts aliases, depth and expanded values while it builds the node graph."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0
        self._values: dict[int, int] = {}  # id(node) -> values it stands for, once every alias in it is expanded

    def compose_node(self, parent, index):
        if self.check_event(AliasEvent):
            mark = self.peek_event().start_mark
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise YamlLimitError(
                    f"{_where(mark)}more than {MAX_YAML_ALIASES} aliases (*name); YAML read by "
                    "distill may use at most that many (an alias bomb?): write the values out"
                )
            node = super().compose_node(parent, index)
            if id(node) not in self._values:  # still being composed: the alias is inside the node it names
                raise YamlLimitError(
                    f"{_where(mark)}an alias refers to a node that contains it (a cycle); write the values out"
                )
            return node
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise YamlLimitError(
                f"{_where(self.peek_event().start_mark)}nested more than {MAX_YAML_DEPTH} levels "
                "deep; YAML read by distill may nest at most that deep"
            )
        node = super().compose_node(parent, index)
        self._depth -= 1
        if isinstance(node, yaml.ScalarNode):
            size = 1
        elif isinstance(node, yaml.SequenceNode):
            size = 1 + sum(self._values[id(c)] for c in node.value)
        else:
            size = 1 + sum(self._values[id(k)] + self._values[id(v)] for k, v in node.value)
        if size > MAX_YAML_VALUES:
            raise YamlLimitError(
                f"{_where(node.start_mark)}this value stands for {size:,} values once its "
                f"aliases are expanded, over the {MAX_YAML_VALUES:,} YAML read by distill may "
                "hold (an alias bomb?): write the values out"
            )
        self._values[id(node)] = size
        return node

    def compose_document(self):
        node = super().compose_document()
        self._values.clear()  # node ids are only unique while the nodes live
        return node


def load_yaml(text: str | bytes) -> object:
    """The one document in `text` as plain Python values (what `yaml.safe_load` gives), within the limits above;
    YamlLimitError (a yaml.YAMLError) over them, other yaml.YAMLErrors for text that is not YAML."""
    if len(text) > MAX_YAML_BYTES:
        raise YamlLimitError(f"{len(text):,} characters, over the {MAX_YAML_BYTES:,} YAML read by distill may have")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


__all__ = ["load_yaml", "YamlLimitError", "MAX_YAML_BYTES", "MAX_YAML_ALIASES", "MAX_YAML_DEPTH", "MAX_YAML_VALUES"]
