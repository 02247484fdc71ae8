"""The data the loss consumes (student outputs, cached teacher features) and the configs that build it.

Kept apart from the term code so the trainer and the config parser can import them without torch math.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor

COMBINE_MODES = ("weighted_sum", "random_teacher", "confidence")
BALANCE_MODES = ("none", "phi_s")


@dataclass
class StudentOutput:
    """One step's student outputs, local to this process."""

    image: Tensor  # (B, E) L2-normalised image embeddings
    text: Tensor  # (B, E) L2-normalised text embeddings
    logit_scale: Tensor  # scalar, already exp()'d; the loss clamps it at 100
    projected: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    # teacher -> {"image": (B, Dt), "text": (B, Dt)} from student.heads.ProjectionHeads, NOT normalised


@dataclass
class TeacherBatch:
    """The cached teacher features for the same rows as the StudentOutput (local to this process)."""

    feats: dict[str, dict[str, Tensor]]  # teacher -> {"image": (B, Dt), "text": (B, Dt)}, L2-normalised
    logit_scale: dict[str, float]  # teacher -> its own logit scale (the cache's `logit_scale` attr)
    route: dict[str, Tensor] | None = None
    # teacher -> (B,) bool: which rows are routed to that teacher (per-sample routing, `loss.routing`); None: every
    # row to every teacher. A row routed to none of a term's teachers contributes 0 to that term.


def _check_weight(what: str, w: float) -> None:
    if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {w!r}")


@dataclass(frozen=True)
class LossTermCfg:
    """One named, weighted loss term built from the loss registry."""

    name: str  # the key it is logged under, e.g. "infonce", "feat_mse"
    kind: str  # registry key: "infonce" | "feature" | "icl" | "affinity"
    weight: float = 1.0  # >= 0; 0 means the term is skipped (never built)
    teachers: dict[str, float] | None = None  # teacher -> weight; None = every teacher, equal weights
    kwargs: dict = field(default_factory=dict)  # term options, e.g. {"metric": "mse"} for feature

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str) or self.name == "loss":
            raise ValueError(f"loss term name must be a non-empty string other than 'loss', got {self.name!r}")
        _check_weight(f"loss term {self.name!r}: weight", self.weight)
        from .terms import LOSSES  # late: the registry fills when the term classes are defined

        try:
            LOSSES.get(self.kind)
        except KeyError as e:
            raise KeyError(f"loss term {self.name!r}: {e.args[0]}") from None
        if self.teachers is not None:
            if not isinstance(self.teachers, dict) or not self.teachers:
                raise ValueError(
                    f"loss term {self.name!r}: teachers must be a non-empty mapping teacher -> weight "
                    f"(or null for every teacher), got {self.teachers!r}"
                )
            for t, w in self.teachers.items():
                _check_weight(f"loss term {self.name!r}: weight of teacher {t!r}", w)
            if not any(w > 0 for w in self.teachers.values()):
                raise ValueError(f"loss term {self.name!r}: every teacher weight is 0; give one a weight > 0")


@dataclass(frozen=True)
class CombineCfg:
    """How the per-teacher values of a term are combined into one number."""

    mode: str = "weighted_sum"  # "weighted_sum" | "random_teacher" (one random teacher per sample, MMKD-CLIP)
    # | "confidence" (per-sample weights from each teacher's own confidence in the pair, no labels; combine.py)
    drop_prob: float = 0.0  # each teacher is dropped per step with this probability (never all of a term's)
    balance: str = "none"  # "none" | "phi_s" (PHI-S standardisation of feature-term targets, cache stats)
    temperature: float = 1.0  # confidence mode: w_it proportional to term weight_t * p_it ** (1 / temperature)

    def __post_init__(self) -> None:
        if self.mode not in COMBINE_MODES:
            raise ValueError(f"combine mode {self.mode!r} is unknown; use one of {', '.join(COMBINE_MODES)}")
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"balance {self.balance!r} is unknown; use one of {', '.join(BALANCE_MODES)}")
        if not isinstance(self.drop_prob, (int, float)) or not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {self.drop_prob!r}")
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"combine temperature must be a finite number > 0, got {t!r}")
