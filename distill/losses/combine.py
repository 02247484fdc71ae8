"""Per-sample teacher weights: weighted sum, one random teacher per sample (MMKD-CLIP), teacher dropping.

Every mode is a (B, T) weight matrix that multiplies the (B, T) per-sample, per-teacher values of a term; the
term is then the batch mean of the row sums. Rows sum to 1, so
- weighted_sum: row = the term's teacher weights renormalised over the kept teachers, term = sum_t w_t mean_i l_it;
- random_teacher: row = one-hot on the sample's teacher, drawn with probability w_t (over the kept teachers), so
  the term is the batch mean of each sample's loss against exactly its teacher, an unbiased estimate of the
  weighted sum. Equivalently: each teacher's mean over the samples assigned to it, weighted by its share.
- confidence: row_t proportional to w_t * p_it^(1/temperature), where p_it is teacher t's own confidence in the
  pair i (its softmax probability of the matching text for image i and of the matching image for text i, over the
  global batch, averaged): no labels, cached features only, so the weights are constants (no gradient).
  `scope: domain` takes that softmax over the rows of row i's domain only; `positives: caption` counts the mass on
  every row with row i's caption (`StepContext.log_confidence`).
Per-sample routing (`route`) multiplies each row by the sample's route mask before normalising: a row is
renormalised over its routed, kept teachers, and a row with none (not routed, or all its teachers dropped this
step) is all zero. The term is still the mean over ALL rows of the batch, unrouted rows counting 0: every process
then divides by the same local batch size, so the mean over processes equals the one-process value with no extra
collective (the price: a term's scale shrinks with the share of unrouted rows).
Dropped teachers get weight 0 rather than being skipped, so every projection head stays in the graph (DDP needs no
find_unused_parameters) and all ranks run the same collectives.

Draw order (one step, one generator): T uniforms for dropping (when drop_prob > 0), then for each term whose
teachers were all dropped (fewest teachers first) one randint to revive one of them, then world_size * B
uniforms for the assignment (random_teacher), of which this rank keeps its own B. A sample's uniform is shared by
every term (inverse-CDF over that term's kept teachers), so terms with the same teachers give a sample the same teacher.
Seed the generator identically on every rank: every rank then drops the same teachers, and each sample gets the
teacher a one-process run over the global batch would give it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distill.losses.distributed import world_and_rank
from distill.losses.spec import CombineCfg


@dataclass(frozen=True)
class TeacherDraw:
    """One step's random choices: which teachers are kept, and each sample's uniform for the assignment."""

    kept: dict[str, bool]
    uniforms: Tensor | None  # (B,) in [0, 1), only for random_teacher


def draw(
    cfg: CombineCfg,
    teacher_names: list[str],
    term_teachers: list[list[str]],
    batch_size: int,
    generator: torch.Generator | None = None,
) -> TeacherDraw:
    """Draw the step's dropped teachers (never all of any term's) and per-sample uniforms."""
    kept = {t: True for t in teacher_names}
    if cfg.drop_prob > 0 and teacher_names:
        u = torch.rand(len(teacher_names), generator=generator)
        kept = {t: bool(u[i] >= cfg.drop_prob) for i, t in enumerate(teacher_names)}
        # revive for the terms with the fewest teachers first, so one revival can serve several terms
        for names in sorted(term_teachers, key=len):
            if names and not any(kept[t] for t in names):
                revive = int(torch.randint(len(names), (1,), generator=generator))
                kept[names[revive]] = True
    uniforms = None
    if cfg.mode == "random_teacher":  # draw for the global batch, keep this rank's rows: same as one process
        world, rank = world_and_rank()
        uniforms = torch.rand(world * batch_size, generator=generator)[rank * batch_size : (rank + 1) * batch_size]
    return TeacherDraw(kept=kept, uniforms=uniforms)


def weight_matrix(
    cfg: CombineCfg,
    weights: dict[str, float],
    step: TeacherDraw,
    batch_size: int,
    device=None,
    route: Tensor | None = None,
    log_confidence: Tensor | None = None,
) -> Tensor:
    """(B, T) weights for a term with teacher weights `weights` (in that order), rows summing to 1 (or 0).

    route: (B, T) bool in the same teacher order, which teachers each row is routed to (None: all). A row's weights
        are renormalised over its routed, kept teachers; a row with none of them is all zero.
    log_confidence: (B, T) log p_it for mode "confidence" (`StepContext.log_confidence`), required there.
    """
    w = torch.tensor([weights[t] if step.kept[t] else 0.0 for t in weights], dtype=torch.float64)
    if w.sum() <= 0:  # a term whose only positive-weight teachers were dropped: fall back to its kept ones
        w = torch.tensor([1.0 if step.kept[t] else 0.0 for t in weights], dtype=torch.float64)
    rows = w.expand(batch_size, -1)
    if route is not None:
        if tuple(route.shape) != (batch_size, len(w)):
            raise ValueError(f"route mask has shape {tuple(route.shape)}; expected ({batch_size}, {len(w)})")
        rows = rows * route.detach().to(device="cpu", dtype=torch.float64)
    if cfg.mode == "confidence":
        if log_confidence is None:
            raise ValueError("combine mode 'confidence' needs the teachers' per-sample log confidences")
        # w_it ~ rows_it * p_it^(1/temperature), normalised in log space so a tiny p cannot underflow a whole row
        logits = rows.log() + log_confidence.detach().to(device="cpu", dtype=torch.float64) / cfg.temperature
        logits = logits.masked_fill(rows <= 0, float("-inf"))
        some = (rows > 0).any(1, keepdim=True)
        out = torch.where(some, logits.masked_fill(~some, 0.0).softmax(1), torch.zeros_like(rows))
        return out.to(device=device, dtype=torch.float32)
    total = rows.sum(1, keepdim=True)
    some = total > 0
    norm = torch.where(some, rows / total.clamp_min(1e-300), torch.zeros_like(rows))  # zero rows stay zero
    if cfg.mode == "weighted_sum":
        out = norm
    else:  # random_teacher: inverse CDF of the row's weights at the sample's uniform
        if step.uniforms is None:
            raise ValueError("combine mode 'random_teacher' needs the per-sample uniforms drawn with it")
        cdf = torch.cumsum(norm, 1)
        # a weight-0 teacher has a zero-width interval, so it is never picked; from the last positive teacher on
        # the CDF is lifted past 1 so rounding cannot hand a uniform near 1 to a trailing dropped teacher
        cols = torch.arange(len(w)).expand(batch_size, -1)
        last = torch.where(norm > 0, cols, torch.full_like(cols, -1)).max(1, keepdim=True).values
        cdf = torch.where(cols >= last, torch.full_like(cdf, 2.0), cdf)
        idx = (cdf <= step.uniforms.to(torch.float64)[:, None]).sum(1)  # = searchsorted(cdf, u, right=True)
        out = torch.nn.functional.one_hot(idx.clamp(max=len(w) - 1), len(w)).to(torch.float64) * some
    return out.to(device=device, dtype=torch.float32)
