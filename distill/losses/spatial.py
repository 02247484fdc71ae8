"""The `spatial` term: the student's patch tokens against each teacher's cached patch tokens (AM-RADIO, UNIC).

The teacher side is `distill cache --tokens G`: the last layer's patch tokens after the final norm, average-pooled
to a G x G grid (per view). The student side is `StudentOutput.tokens`: its own patch tokens (same definition)
through that teacher's adaptor MLP, pooled to the same grid (`distill.training.heads.TokenAdaptors`). With stored views
the student sees exactly the view whose tokens were cached, so the grids cover the same pixels; without views
the teacher saw its eval transform and the student its own crop, and they cover nearly the same region only.
Per-sample values, so teacher weights, routing and every combine mode apply as for the other terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.terms import LossTerm, StepContext, _named, register_loss
from teachers.kernel.modality import Modality


def teacher_tokens(ctx: StepContext, name: str) -> Tensor:
    """(B, G*G, Dt) float32 cached patch tokens of teacher `name` for the batch's rows, checked."""
    got = None if ctx.teachers is None else ctx.teachers.tokens.get(name)
    if got is None:
        raise ValueError(
            f"the spatial loss term needs the cached patch tokens of teacher {name!r}, but the batch has "
            f"none: cache that teacher with `distill cache --tokens G` (a new file or teacher name)"
        )
    if got.dim() != 3 or got.shape[0] != ctx.batch_size:
        raise ValueError(
            f"teacher {name!r} patch tokens have shape {tuple(got.shape)}; expected "
            f"({ctx.batch_size}, G*G, D), one grid per row (the view the student saw)"
        )
    return got.to(ctx.student.image.device).float()


def student_tokens(ctx: StepContext, name: str, shape: torch.Size) -> Tensor:
    """(B, G*G, Dt) float32 adapted student patch tokens for teacher `name`, of the teacher's `shape`."""
    got = ctx.student.tokens.get(name)
    if got is None:
        raise KeyError(
            f"the student has no adapted patch tokens for teacher {name!r}; it has "
            f"{sorted(ctx.student.tokens) or 'none'} (build DistillModel with TokenAdaptors for every "
            f"teacher of a spatial term)"
        )
    if got.shape != shape:
        raise ValueError(
            f"the student's adapted patch tokens for teacher {name!r} have shape {tuple(got.shape)}, "
            f"the cached ones {tuple(shape)}: the adaptors were built for another cache"
        )
    return got.float()


@register_loss(key="spatial")
class Spatial(LossTerm):
    """Adapted, pooled student patch tokens vs the teacher's cached ones, averaged over the G*G tokens.

    metric: "cosine" (1 - cos per token), "smooth_l1" (smooth-L1 with `beta` on the raw tokens, mean over dims and
    tokens: like AM-RADIO, the teacher's own scale is the target, not unit vectors), or "cosine+smooth_l1"
    (AM-RADIO's mix, `cos_weight` * cosine + (1 - `cos_weight`) * smooth-L1; 0.9 as in AM-RADIO).
    """

    METRICS = ("cosine", "smooth_l1", "cosine+smooth_l1")
    uses_logit_scale = False
    uses_tokens = True

    def __init__(self, metric: str = "cosine", beta: float = 1.0, cos_weight: float = 0.9):
        super().__init__()
        if metric not in self.METRICS:
            raise ValueError(f"spatial metric {metric!r} is unknown; use one of {', '.join(self.METRICS)}")
        if not (beta > 0 and 0.0 <= cos_weight <= 1.0):
            raise ValueError(
                f"spatial needs beta > 0 and cos_weight in [0, 1], got beta={beta}, cos_weight={cos_weight}"
            )
        self.metric, self.beta, self.cos_weight = metric, float(beta), float(cos_weight)

    def student_modalities(self) -> tuple[Modality, ...]:
        return (Modality.IMAGE,)

    def per_sample(self, ctx: StepContext, teacher: str | None) -> Tensor:
        teacher = _named(teacher)
        y = teacher_tokens(ctx, teacher)
        p = student_tokens(ctx, teacher, y.shape)
        cos = (1 - F.cosine_similarity(p, y, dim=-1)).mean(-1)
        if self.metric == "cosine":
            return cos
        l1 = F.smooth_l1_loss(p, y, reduction="none", beta=self.beta).mean((1, 2))
        return l1 if self.metric == "smooth_l1" else self.cos_weight * cos + (1 - self.cos_weight) * l1
