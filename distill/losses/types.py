"""The data the loss consumes: student outputs and cached teacher features (the configs are in spec.py).

Kept apart from the term code so the trainer can import them without the term maths.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from teachers.modality import Pair


@dataclass
class StudentOutput:
    """One step's student outputs, local to this process."""

    image: Tensor  # (B, E) L2-normalised image embeddings
    text: Tensor  # (B, E) L2-normalised text embeddings
    logit_scale: Tensor  # scalar, already exp()'d; the loss clamps it at 100
    projected: dict[str, Pair[Tensor]] = field(default_factory=dict)
    # teacher -> Pair(image (B, Dt), text (B, Dt)) from distill.heads.ProjectionHeads, NOT normalised


@dataclass
class TeacherBatch:
    """The cached teacher features for the same rows as the StudentOutput (local to this process)."""

    feats: dict[str, Pair[Tensor]]  # teacher -> Pair(image (B, Dt), text (B, Dt)), L2-normalised
    logit_scale: dict[str, float]  # teacher -> its own logit scale (the cache's `logit_scale` attr)
    route: dict[str, Tensor] | None = None
    # teacher -> (B,) bool: which rows are routed to that teacher (per-sample routing, `loss.routing`); None: every
    # row to every teacher. A row routed to none of a term's teachers contributes 0 to that term.
