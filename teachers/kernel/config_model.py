"""The config layer's base: strict pydantic v2 models, and their errors as one-line `ConfigError`s naming the key.

Why pydantic v2 (2.14, pinned) rather than OmegaConf structured configs: every rule lives on the model that owns
the value (field types, ranges, registered kinds), so the training config, the loss and the eval tasks share one
validator and one error format; `extra="forbid"` refuses a typo; field descriptions feed `distill train --help`;
and a model validates the nested mapping YAML gives without a converter of ours. OmegaConf checks types but has no
value validators (ranges, choices, cross-field rules), and its interpolation and merging are features we do not use.
Why so strict: a typo in a long job's config (`optim.warmpu=500`) must fail at once, naming the key and suggesting
the close match, never be ignored (nanoGPT's configurator rule, without its `exec`).
"""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Strict, ValidationError
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and what to do."""


class UnknownNameError(ConfigError, KeyError):
    """An unknown registered name (a loss kind): a ConfigError that is also the registry's KeyError."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class KeyedError(ConfigError):
    """A ConfigError whose message names its key in full (`loss.terms.affinity.kwargs.kl must be bool, ...`):
    raised from a validator, it is reported as it is, without the validated model's location before it."""


def unknown_name(message: str) -> PydanticCustomError:
    """Raise this from a validator for a name the registry does not know (becomes an UnknownNameError)."""
    return PydanticCustomError("unknown_name", "{message}", {"message": message})


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):  # pydantic's lax float takes True as 1.0; a bool in a float field is a mistake
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return v


# Field types: no silent casts ("1" -> True, 1.5 -> 1), except that a float takes an int or a numeric string
# (YAML 1.1 reads 5e-4, without a dot, as a string).
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Float = Annotated[float, BeforeValidator(_no_bool)]


def check(ok: bool, msg: str) -> None:
    """Inside a Section's validator: fail with `msg` (pydantic turns the ValueError into the one-line ConfigError)."""
    if not ok:
        raise ValueError(msg)


class Section(BaseModel):
    """A frozen config model: unknown keys and wrong types are refused; direct construction raises ConfigError."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    where: ClassVar[str] = ""  # its dotted path in a Config ("loss.combine"), for messages of direct construction
    # what direct construction raises: a job's own error class (a ConfigError too) keeps its callers' `except`
    error: ClassVar[type[ConfigError]] = ConfigError

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise as_error(config_error(e, type(self), type(self).where), type(self).error) from None

    # Nested sections are validated by pydantic-core directly (errors keep their full location), not through this
    # __init__: the flag pydantic's own BaseModel.__init__ carries says so.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


def as_error(e: ConfigError, cls: type[ConfigError]) -> ConfigError:
    """`e` as an instance of `cls` (same message), unless it already is one or names an unknown registered name."""
    return e if isinstance(e, (cls, UnknownNameError)) else cls(str(e))


def field_default(model: type[BaseModel], name: str) -> Any:
    """The default of `model`'s field `name` (its factory called); PydanticUndefined when it is required."""
    f = model.model_fields[name]
    return f.default_factory() if f.default_factory is not None else f.default  # type: ignore[call-arg]


# -- turning a ValidationError into one line ----------------------------------------------------------------
def _strip(tp: Any) -> Any:
    """The annotation without Annotated metadata and without an Optional's None."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, types.UnionType):
            rest = [a for a in get_args(tp) if a is not type(None)]
            if len(rest) != 1:
                return tp
            tp = rest[0]
        else:
            return tp


def is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def field_type(model: type[BaseModel], name: str) -> Any:
    """The field's annotation with its metadata (Strict, validators) put back."""
    f = model.model_fields[name]
    return Annotated[tuple([f.annotation, *f.metadata])] if f.metadata else f.annotation


def fixed_tuple(tp: Any) -> tuple | None:
    """The item types of a fixed-length tuple annotation (tuple[float, float]), else None."""
    tp = _strip(tp)
    args = get_args(tp)
    if get_origin(tp) is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return args
    return None


def annotation_at(root: Any, loc: tuple) -> Any:
    """The annotation of the value at `loc` (a pydantic error location) below the type `root`."""
    tp = root
    for k in loc:
        tp = _strip(tp)
        if is_model(tp):
            if k not in tp.model_fields:
                return Any
            tp = field_type(tp, k)
        elif get_origin(tp) is tuple:
            args = get_args(tp)
            if len(args) == 2 and args[1] is Ellipsis:
                tp = args[0]
            else:
                tp = args[k] if isinstance(k, int) and k < len(args) else Any
        elif get_origin(tp) is dict:
            tp = get_args(tp)[0] if k == "[key]" else get_args(tp)[1]
        else:
            return Any
    return tp


def type_name(tp: Any) -> str:
    """A short readable name: `int | None`, `tuple[float, float]`, `a mapping of CombineCfg fields`."""
    if get_origin(tp) is Annotated:
        return type_name(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "None"
    if tp is Any:
        return "any value"
    if is_model(tp):
        return f"a mapping of {tp.__name__} fields"
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{type_name(args[0])}, ...]"
        return f"tuple[{', '.join(type_name(a) for a in args)}]"
    if get_origin(tp) is dict:
        return f"dict[{', '.join(type_name(a) for a in get_args(tp))}]"
    if get_origin(tp) is list:
        return f"list[{', '.join(type_name(a) for a in get_args(tp))}]"
    return tp.__name__ if isinstance(tp, type) else str(tp)


def dotted(where: str, loc: tuple) -> str:
    """('loss', 'terms', 0, 'weight') -> loss.terms[0].weight, below the prefix `where`."""
    out = where
    for k in loc:
        if isinstance(k, int):
            out += f"[{k}]"
        elif k != "[key]":
            out = f"{out}.{k}" if out else str(k)
    return out


def join_message(key: str, msg: str) -> str:
    """`key` before `msg`, unless the message already starts with it (a model validator names its own keys)."""
    if not key or msg.startswith((key + ".", key + " ", key + ":", key + "=")):
        return msg
    return f"{key} {msg}" if msg.startswith("must ") else f"{key}: {msg}"


def unknown_key_message(key: str, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    full = f"{where}.{key}" if where else key
    return f"unknown key {full!r}{hint} (known keys here: {', '.join(known)})"


def config_error(e: ValidationError, root: Any, where: str = "") -> ConfigError:
    """The first error of `e` (validating the type `root` at the dotted path `where`) as a one-line ConfigError."""
    errors = e.errors(include_url=False)
    err = errors[0]
    loc, kind = tuple(err["loc"]), err["type"]
    key = dotted(where, loc)
    parent = dotted(where, loc[:-1])
    if kind == "unknown_name":
        return UnknownNameError(join_message(key, err["msg"]))
    if kind == "extra_forbidden":
        model = _strip(annotation_at(root, loc[:-1]))
        known = list(model.model_fields) if is_model(model) else []
        return ConfigError(unknown_key_message(str(loc[-1]), known, parent))
    items = fixed_tuple(annotation_at(root, loc[:-1])) if kind == "missing" else None
    if kind == "too_long":
        items, parent = fixed_tuple(annotation_at(root, loc)), key
    if items is not None:
        tp = annotation_at(root, loc[:-1] if kind == "missing" else loc)
        return ConfigError(f"{parent} must have {len(items)} items ({type_name(tp)}), got {err['input']!r}")
    if kind == "missing":
        missing = [str(x["loc"][-1]) for x in errors if x["type"] == "missing" and tuple(x["loc"][:-1]) == loc[:-1]]
        return ConfigError(f"{parent or 'config'} is missing required key(s): {', '.join(missing)}")
    if kind in ("value_error", "assertion_error"):
        error = err["ctx"]["error"]
        return ConfigError(str(error) if isinstance(error, KeyedError) else join_message(key, str(error)))
    value = err["input"]
    return ConfigError(
        f"{key or 'config'} must be {type_name(annotation_at(root, loc))}, got {value!r} ({type(value).__name__})"
    )
