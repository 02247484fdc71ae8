"""The one parser for model SPEC strings (DESIGN.md): which back-end loads a model, and from where.

Forms: `hf-hub:org/repo`, `local-dir:PATH`, `MODEL/PRETRAINED_TAG` (open_clip built-in), `hf:ID_OR_PATH` (any
`transformers` dual encoder; `hf-clip:ID_OR_PATH` is the same back-end), `py:module:function`, or a registry alias
(`biomedclip`, `plip`, ...). A bare string that looks like a
path is refused with the prefix to use, as timm's `parse_model_name` does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

PREFIXES = ("hf-hub:", "local-dir:", "hf-clip:", "hf:", "py:")


@dataclass(frozen=True)
class Spec:
    """A parsed SPEC: `kind` picks the back-end, `target` is passed to it untouched."""

    kind: str  # "hf-hub" | "local-dir" | "open_clip" | "hf" | "hf-clip" | "py" | "alias" | a plug-in's prefix
    target: str
    raw: str

    @property
    def backend(self) -> str:
        return {"hf-hub": "open_clip", "local-dir": "open_clip", "open_clip": "open_clip"}.get(self.kind, self.kind)


def parse_spec(spec: str) -> Spec:
    """Parse a SPEC string; raise ValueError with the right form when it is malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty model SPEC; expected one of hf-hub:ORG/REPO, local-dir:PATH, "
                         "MODEL/TAG, hf:ID_OR_PATH, py:module:function or a registry alias")
    s = spec.strip()
    for prefix in PREFIXES:
        if s.startswith(prefix):
            rest = s[len(prefix):]
            if not rest:
                raise ValueError(f"SPEC {spec!r}: nothing after {prefix!r}")
            kind = prefix[:-1]
            if kind == "py" and rest.count(":") != 1:
                raise ValueError(f"SPEC {spec!r}: expected py:module.path:function")
            if kind == "hf-hub" and rest.count("/") != 1:
                raise ValueError(f"SPEC {spec!r}: expected hf-hub:ORG/REPO")
            return Spec(kind, rest, spec)
    if ":" in s.split("/")[0] and not os.path.exists(s):
        raise ValueError(f"SPEC {spec!r}: unknown prefix; known prefixes are {', '.join(PREFIXES)}")
    looks_like_path = s.startswith((".", "/", "~")) or os.sep in s and os.path.exists(s) or os.path.isdir(s)
    if looks_like_path:
        hint = "hf:" if os.path.isfile(os.path.join(s, "config.json")) and not os.path.isfile(
            os.path.join(s, "open_clip_config.json")) else "local-dir:"
        raise ValueError(f"SPEC {spec!r} looks like a path; write {hint}{s}")
    if "/" in s:
        model, _, tag = s.partition("/")
        if not model or not tag or "/" in tag:
            raise ValueError(f"SPEC {spec!r}: expected MODEL/PRETRAINED_TAG (open_clip built-in)")
        return Spec("open_clip", s, spec)
    return Spec("alias", s, spec)
