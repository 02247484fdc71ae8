"""The loss's config models: one term (`LossTermCfg`) and how teachers combine (`CombineCfg`).

They are the `loss.terms` items and `loss.combine` section of the training config AND what `DistillLoss` reads:
one set of types, validated when the config is loaded (kind, options, weights), long before a run opens a file.
`term_class` is the one place that asks the `LOSSES` registry about a kind.
Why here and torch-free (`distill.losses.spec` re-exports them): `distill train` checks the config before torch is
imported. Validated with the context `{"static": True}`, a term is checked without its class (kind by name, from
`distill.config.loss_names`; its options are left for the full check, which builds the term and so imports torch).
A term's options are typed by its constructor's annotations (`check_options`): `kl: bool` refuses `kl=maybe`,
naming `loss.terms.affinity.kwargs.kl`, and a choice annotated as a Literal refuses a value outside it.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import sys
import types
import typing
from typing import TYPE_CHECKING, Any, Literal, Union, cast, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from distill.config.loss_names import BALANCE_MODES, BUILTIN_TERMS, COMBINE_MODES, POSITIVES, SCOPES, plugin_kinds
from teachers.kernel.config_model import Bool, Float, Int, KeyedError, Section, Str, _strip, type_name, unknown_name

if TYPE_CHECKING:
    from distill.losses.terms import LossTerm

__all__ = [
    "LossTermCfg",
    "CombineCfg",
    "term_class",
    "build_term",
    "check_options",
    "options_model",
    "static",
    "COMBINE_MODES",
    "BALANCE_MODES",
    "POSITIVES",
    "SCOPES",
]


def static(info: ValidationInfo | None) -> bool:
    """Whether this validation runs before torch is imported (context {"static": True}): skip what needs it."""
    return bool(info is not None and isinstance(info.context, dict) and info.context.get("static"))


def _check_kind(kind: str, info: ValidationInfo | None) -> None:
    """An unknown kind raises with close matches: by name before torch is imported (built-ins and plug-ins'
    entry points), else through the registry (which also knows terms registered in code)."""
    if kind in BUILTIN_TERMS:
        return
    if static(info) and "distill.losses.terms" not in sys.modules:
        known = sorted({*BUILTIN_TERMS, *plugin_kinds()})
        if kind not in known:
            close = difflib.get_close_matches(kind, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise unknown_name(f"unknown loss {kind!r}{hint} (known: {', '.join(known)})")
        return
    try:
        term_class(kind)
    except KeyError as e:
        raise unknown_name(e.args[0]) from None


def term_class(kind: str) -> type[LossTerm]:
    """The registered term class of `kind`; KeyError with close matches when unknown (imports torch)."""
    import distill.losses.siglip  # noqa: F401, PLC0415 (lazy: torch kept off the config check; registers siglip)
    import distill.losses.spatial  # noqa: F401, PLC0415 (lazy: torch kept off the config check; registers spatial)
    from distill.losses.terms import LOSSES  # noqa: PLC0415 (lazy: torch kept off the config check)

    return LOSSES.get(kind)


# the plain types of a term's constructor annotations, made strict: `kl: bool` refuses "maybe" and 1 alike
_STRICT = {bool: Bool, int: Int, float: Float, str: Str}


def _strict(tp: Any) -> Any:
    """`tp` with bool, int, float and str made strict, inside unions, tuples and lists too (a float takes an int)."""
    if tp in _STRICT:
        return _STRICT[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return Union[tuple(_strict(a) for a in args)]  # noqa: UP007 (built from a runtime tuple: no X | Y spelling)
    if origin in (tuple, list) and args:
        return origin[tuple(_strict(a) if a is not Ellipsis else a for a in args)]
    return tp


@functools.cache
def options_model(cls: type) -> type[BaseModel]:
    """A strict model of the options `cls` takes: its constructor's parameters, typed by their annotations
    (a choice is a Literal), with their defaults. An unannotated parameter takes any value."""
    hints = typing.get_type_hints(cast(Any, cls).__init__)  # the class's own constructor, not an instance's
    fields: dict[str, Any] = {}
    for p in inspect.signature(cls).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        fields[p.name] = (_strict(hints.get(p.name, Any)), ... if p.default is p.empty else p.default)
    return create_model(
        f"{cls.__name__}Options", __config__=ConfigDict(extra="allow", arbitrary_types_allowed=True), **fields
    )


def check_options(name: str, kind: str, cls: type, kwargs: dict) -> None:
    """Each option's value against its annotation: a choice outside its Literal is a ValueError in the terms'
    own words ("affinity scope 'x' is unknown; use one of batch, domain"); any other type error a KeyedError
    naming `loss.terms.NAME.kwargs.OPTION`."""
    try:
        options_model(cls).model_validate(kwargs)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        option = str(err["loc"][0])
        value, tp = kwargs[option], options_model(cls).model_fields[option].annotation
        if err["type"] == "literal_error" and get_origin(_strip(tp)) is Literal:
            raise ValueError(
                f"{kind} {option} {value!r} is unknown; use one of {', '.join(map(str, get_args(_strip(tp))))}"
            ) from None
        raise KeyedError(
            f"loss.terms.{name}.kwargs.{option} must be {type_name(tp)}, got {value!r} ({type(value).__name__})"
        ) from None


def build_term(name: str, kind: str, kwargs: dict) -> LossTerm:
    """The registered term `kind` built with `kwargs`; unknown options or bad values raise ValueError."""
    cls = term_class(kind)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        opts = [p for p in inspect.signature(cls).parameters]
        raise ValueError(
            f"loss term {name!r} (kind {kind!r}): bad options {sorted(kwargs)}: {e}; "
            f"its options are: {', '.join(opts) or 'none'}"
        ) from None
    check_options(name, kind, cls, kwargs)
    return cls(**kwargs)


def _weight_error(what: str, w: float) -> str | None:
    return None if math.isfinite(w) and w >= 0 else f"{what} must be a finite number >= 0, got {w!r}"


class LossTermCfg(Section):
    """One named, weighted term of the loss. Positional arguments follow the field order: name, kind, weight, ..."""

    where = "loss.terms"
    name: Str | None = Field(None, description="key in logs; default: the kind")
    kind: Str = Field(description="a registered loss kind: infonce | siglip | feature | icl | affinity | spatial")
    weight: Float = Field(1.0, description=">= 0; 0 skips the term")
    teachers: dict[Str, Float] | None = Field(None, description="teacher -> weight for this term; null: loss.teachers")
    kwargs: dict[Str, Any] = Field(
        default_factory=dict,
        description="the term's options, e.g. {metric: mse}; "
        "infonce, icl: {positives: diagonal|caption}; affinity: {kl: bool, scope: "
        "batch|domain (distributions over the row's own domain in the batch; needs "
        "data.domain_column), positives: diagonal|caption}",
    )

    def __init__(self, *args: Any, **data: Any) -> None:
        data.update(zip(("name", "kind", "weight", "teachers", "kwargs"), args))
        super().__init__(**data)

    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]  # see Section.__init__

    @property
    def label(self) -> str:
        """The key it is logged under: its name, else its kind."""
        return self.name or self.kind

    @property
    def uses_teachers(self) -> bool:
        known = BUILTIN_TERMS.get(self.kind)
        return bool(term_class(self.kind).uses_teachers) if known is None else known

    @property
    def static_uses_teachers(self) -> bool | None:
        """uses_teachers of a built-in kind, None for a plug-in's (known only by importing it)."""
        return BUILTIN_TERMS.get(self.kind)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> LossTermCfg:
        if self.label == "loss" or not self.label.strip():
            raise ValueError(f"loss term name must be a non-empty string other than 'loss', got {self.name!r}")
        _check_kind(self.kind, info)
        bad = _weight_error(f"loss term {self.label!r}: weight", self.weight)
        for t, w in (self.teachers or {}).items():
            bad = bad or _weight_error(f"loss term {self.label!r}: weight of teacher {t!r}", w)
        if bad:
            raise ValueError(bad)
        uses = self.uses_teachers if self.static_uses_teachers is not None or not static(info) else None
        if self.teachers is not None:
            if uses is False:
                raise ValueError(f"loss term {self.label!r} (kind {self.kind!r}) uses no teachers; remove `teachers`")
            if not self.teachers:
                raise ValueError(
                    f"loss term {self.label!r}: teachers must be a non-empty mapping teacher -> weight "
                    f"(or null for every teacher)"
                )
            if not any(w > 0 for w in self.teachers.values()):
                raise ValueError(f"loss term {self.label!r}: every teacher weight is 0; give one a weight > 0")
        if static(info):  # the options are checked by building the term, which needs torch
            return self
        try:  # options are checked now, not when the run is built: e.g. kwargs.positives must be known
            build_term(self.label, self.kind, self.kwargs)
        except (TypeError, KeyError) as e:
            raise ValueError(f"loss term {self.label!r}: {e}") from None
        return self


class CombineCfg(Section):
    """How the per-teacher values of a term are combined into one number (see combine.py)."""

    where = "loss.combine"
    mode: Str = Field(
        "weighted_sum",
        description="weighted_sum (every teacher) | random_teacher (one random "
        "teacher per sample, MMKD-CLIP) | confidence (per sample, weight_t * p_it^(1/temperature))",
    )
    drop_prob: Float = Field(0.0, description="drop each teacher per step with this probability, in [0, 1)")
    balance: Str = Field("none", description="none | phi_s (standardise feature-term targets with cache stats)")
    temperature: Float = Field(1.0, description="confidence mode: > 0; lower sharpens towards the surest teacher")
    scope: Str = Field(
        "batch",
        description="confidence mode: batch | domain (p_it over the rows of row i's domain "
        "in the batch only; needs data.domain_column)",
    )
    positives: Str = Field(
        "diagonal",
        description="confidence mode: diagonal | caption (p_it = the teacher's "
        "probability mass on every row with row i's caption)",
    )

    @field_validator("mode", "balance", "scope", "positives")
    @classmethod
    def _one_of(cls, v: str, info) -> str:
        what, choices = {
            "mode": ("combine mode", COMBINE_MODES),
            "balance": ("balance", BALANCE_MODES),
            "scope": ("scope", SCOPES),
            "positives": ("positives", POSITIVES),
        }[info.field_name]
        if v not in choices:
            raise ValueError(f"{what} {v!r} is unknown; use one of {', '.join(choices)}")
        return v

    @model_validator(mode="after")
    def _confidence_only(self) -> CombineCfg:
        """scope and positives shape the confidence weights only: set for another mode they would do nothing."""
        for key, default in (("scope", "batch"), ("positives", "diagonal")):
            if getattr(self, key) != default and self.mode != "confidence":
                raise ValueError(
                    f"loss.combine.{key}={getattr(self, key)} applies to mode=confidence only "
                    f"(mode is {self.mode}); remove it, or set it in the term's kwargs (affinity)"
                )
        return self

    @field_validator("drop_prob")
    @classmethod
    def _drop_prob(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"must be in [0, 1), got {v!r}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"must be a finite number > 0, got {v!r}")
        return v
