"""Command-line flags made from a job model's fields: the default, the help and the value type are the field's.

Why: each default is written once, on the model (`CacheJob`, `EvalJob`, `DemoJob`, `CorpusJob`); argparse only
splits the command line, and the model validates the whole job in one step (one parse per command), with the
same one-line errors as the training config. `tests/test_cli_flags.py` checks that every flag of those commands
maps to a field with the field's default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from teachers.kernel.config_model import _strip, field_default

if TYPE_CHECKING:  # argparse itself is distill.cli's
    import argparse

__all__ = ["add_flag", "job_fields"]


def _value_type(model: type[BaseModel], name: str) -> Any:
    """int or float for a numeric field (optional or not), else None (argparse's text)."""
    tp = _strip(model.model_fields[name].annotation)
    return tp if tp in (int, float) else None


def add_flag(parser: Any, model: type[BaseModel], name: str, *flags: str, **kw: Any) -> argparse.Action:
    """Add `--NAME` (or `flags`) for the field `name` of `model` to `parser` (a parser or an argument group).

    The default is the field's (required when it has none); the help is `kw["help"]`, else the field's
    description; the type is int or float for a numeric field unless `kw` gives one; a boolean field that is
    False by default is a switch (`store_true`), True by default a `--no-` switch (`store_false`); a repeatable
    flag (`append`) defaults to None, which `job_fields` turns into the field's default."""
    default = field_default(model, name)
    if kw.get("action") == "append" and default is not PydanticUndefined:
        default = None
    kw.setdefault("dest", name)
    help_text = kw.pop("help", model.model_fields[name].description)
    if help_text:
        kw["help"] = help_text.replace("%", "%%")
    if default is PydanticUndefined:
        kw.setdefault("required", True)  # False where another flag can stand in (--source or --recipe)
    else:
        kw["default"] = default
    if isinstance(default, bool) and "action" not in kw:
        kw["action"] = "store_false" if default else "store_true"
    elif "type" not in kw and kw.get("action") not in ("store_true", "store_false"):
        vtype = _value_type(model, name)
        if vtype is not None:
            kw["type"] = vtype
    if not flags:
        flags = (("--no-" if kw.get("action") == "store_false" else "--") + name.replace("_", "-"),)
    return parser.add_argument(*flags, **kw)


def job_fields(model: type[BaseModel], args: argparse.Namespace, **given: Any) -> dict[str, Any]:
    """The model's fields found in `args` (set by `add_flag`), then `given` (fields made from other flags; None:
    the field's default)."""
    return {
        **{k: getattr(args, k) for k in model.model_fields if hasattr(args, k)},
        **{k: v for k, v in given.items() if v is not None},
    }
