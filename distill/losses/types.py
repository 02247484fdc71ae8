"""The data the loss consumes: student outputs and cached teacher features (the configs are in spec.py).

Kept apart from the term code so the trainer can import them without the term maths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from teachers.kernel.modality import Pair


@dataclass
class StudentOutput:
    """One step's student outputs, local to this process."""

    image: Tensor  # (B, E) L2-normalised image embeddings
    text: Tensor  # (B, E) L2-normalised text embeddings
    logit_scale: Tensor  # scalar, already exp()'d; the loss clamps it at 100
    projected: dict[str, Pair[Tensor]] = field(default_factory=dict)
    # teacher -> Pair(image (B, Dt), text (B, Dt)) from distill.training.heads.ProjectionHeads, NOT normalised
    logit_bias: Tensor | None = None  # scalar, SigLIP's learnable bias (open_clip's `logit_bias`); None: no bias
    tokens: dict[str, Tensor] = field(default_factory=dict)
    # teacher -> (B, G*G, Dt): the student's patch tokens through that teacher's adaptor
    # (distill.training.heads.TokenAdaptors), pooled to the teacher's cached G x G grid; only with a spatial term


@dataclass
class TeacherBatch:
    """The cached teacher features for the same rows as the StudentOutput (local to this process)."""

    feats: dict[str, Pair[Tensor]]  # teacher -> Pair(image (B, Dt), text (B, Dt)), L2-normalised
    logit_scale: dict[str, float]  # teacher -> its own logit scale (the cache's `logit_scale` attr)
    route: dict[str, Tensor] | None = None
    # teacher -> (B,) bool: which rows are routed to that teacher (per-sample routing, `loss.routing`); None: every
    # row to every teacher. A row routed to none of a term's teachers contributes 0 to that term.
    logit_bias: dict[str, float] = field(default_factory=dict)
    # teacher -> its logit bias, for sigmoid (SigLIP-style) teachers only; softmax teachers are absent
    tokens: dict[str, Tensor] = field(default_factory=dict)
    # teacher -> (B, G*G, Dt) cached patch tokens (`distill cache --tokens G`), of the view the student saw; only the
    # teachers of a spatial term
    domains: Tensor | None = None
    # (B,) int64 domain id of each row (data.domain_column, `distill.data.domains.domain_ids`): read by `scope: domain`
    # (affinity, loss.combine), gathered across processes with the caption ids; None: no domains
    row_weights: Tensor | None = None
    # (B,) float per-row multiplier of every teacher term (loss.routing.weights by column value); None: all 1


def teacher_logit_bias(attrs: Mapping[str, Any]) -> float | None:
    """A cached teacher's logit bias from its attrs (`logit_bias`), None for a softmax teacher (absent or NaN)."""
    b = attrs.get("logit_bias")
    if b is None:
        return None
    b = float(b)
    return None if math.isnan(b) else b
