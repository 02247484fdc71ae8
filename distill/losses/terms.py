"""The loss terms, registered by kind: infonce, feature, icl, affinity (siglip is in siglip.py).

Each term returns PER-SAMPLE values (B,) for this process's rows, for one teacher (or none); `DistillLoss` weights
and averages them (see combine.py). The contrastive-type terms score local rows against the global batch
gathered across processes (see distributed.py), so their batch mean, averaged over ranks, is the one-process value.
All maths runs in float32 whatever the autocast dtype of the inputs.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.config.loss_names import AFFINITY_PAIRS, AffinityPairs, FeatureMetric, Positives, Scope
from distill.losses.context import CROSS, INTRA, MAX_LOGIT_SCALE, POSITIVES, SCOPES, StepContext  # noqa: F401  (re-exported)
from teachers.kernel.modality import MODALITIES, Modality
from teachers.kernel.registry import Registry

LOSSES: Registry[type[LossTerm]] = Registry("loss", entry_point_group="biomed_distill.losses")
register_loss = LOSSES.register


def _soft_ce(teacher_logits: Tensor, student_logits: Tensor, kl: bool) -> Tensor:
    """Per-row cross-entropy (or KL) of the student's softmax from the teacher's."""
    log_p_t = teacher_logits.log_softmax(-1)
    ce = -(log_p_t.exp() * student_logits.log_softmax(-1)).sum(-1)
    return ce + (log_p_t.exp() * log_p_t).sum(-1) if kl else ce


def _class_log_mass(log_p: Tensor, classes: Tensor, num: int) -> Tensor:
    """(B, N) log-probabilities over columns -> (B, num) log of each class's total mass (columns grouped by
    `classes`, (N,) int64); a class with no finite column in a row is -inf. Exact and stable: a logsumexp per class
    shifted by that class's own maximum (detached: the shift does not change the value)."""
    idx = classes.to(log_p.device).expand_as(log_p)
    top = log_p.new_full((log_p.shape[0], num), float("-inf")).scatter_reduce(1, idx, log_p.detach(), "amax")
    top = top.masked_fill(~torch.isfinite(top), 0.0)
    mass = log_p.new_zeros(top.shape).scatter_add(1, idx, (log_p - top.gather(1, idx)).exp())
    some = mass > 0
    return torch.where(some, mass.masked_fill(~some, 1.0).log() + top, torch.full_like(mass, float("-inf")))


def _local_soft_ce(
    teacher_logits: Tensor, student_logits: Tensor, kl: bool, keep: Tensor | None, classes: tuple[Tensor, int] | None
) -> Tensor:
    """`_soft_ce` restricted to the columns `keep` ((B, N) bool; None: all) and, with `classes`, over caption
    classes (each class's probability = the sum over its columns). Excluded columns (classes) have probability 0 in
    both distributions and add nothing, gradient included; a row whose only column is its own gives 0."""

    def log_probs(logits: Tensor) -> Tensor:
        lp = (logits if keep is None else logits.masked_fill(~keep, float("-inf"))).log_softmax(-1)
        return lp if classes is None else _class_log_mass(lp, *classes)

    log_t, log_s = log_probs(teacher_logits), log_probs(student_logits)
    valid = torch.isfinite(log_t) & torch.isfinite(log_s)
    log_t, log_s = log_t.masked_fill(~valid, 0.0), log_s.masked_fill(~valid, 0.0)
    p_t = log_t.exp() * valid
    ce = -(p_t * log_s).sum(-1)
    return ce + (p_t * log_t).sum(-1) if kl else ce


def _sigmoid_ce(teacher_logits: Tensor, student_logits: Tensor, kl: bool, keep: Tensor | None = None) -> Tensor:
    """Per-row sum over pairs of the binary cross-entropy (or KL) of the student's sigmoid from the teacher's;
    `keep` ((B, N) bool): sum over those pairs only."""
    if keep is not None:
        return _sigmoid_ce_pairs(teacher_logits, student_logits, kl).mul(keep).sum(-1)
    p_t = teacher_logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(student_logits, p_t, reduction="none").sum(-1)
    return ce - F.binary_cross_entropy_with_logits(teacher_logits, p_t, reduction="none").sum(-1) if kl else ce


def _sigmoid_ce_pairs(teacher_logits: Tensor, student_logits: Tensor, kl: bool) -> Tensor:
    """(B, N) per-pair binary cross-entropy (or KL) of `_sigmoid_ce`, before the sum over the row."""
    p_t = teacher_logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(student_logits, p_t, reduction="none")
    return ce - F.binary_cross_entropy_with_logits(teacher_logits, p_t, reduction="none") if kl else ce


def _check_choice(kind: str, option: str, value: str, allowed: tuple[str, ...]) -> str:
    """`value` when it is one of `allowed`; else a one-line ValueError naming the term kind and option."""
    if value not in allowed:
        raise ValueError(f"{kind} {option} {value!r} is unknown; use one of {', '.join(allowed)}")
    return value


def _check_positives(kind: str, positives: str) -> str:
    return _check_choice(kind, "positives", positives, POSITIVES)


def _check_scope(kind: str, scope: str) -> str:
    return _check_choice(kind, "scope", scope, SCOPES)


def _named(teacher: str | None) -> str:
    """The teacher a teacher-reading term is called for (only terms with uses_teachers = False get None)."""
    if teacher is None:
        raise ValueError("this loss term reads a teacher's features: per_sample needs a teacher name, got None")
    return teacher


class LossTerm(nn.Module):
    """A term computed per sample; `uses_teachers` says whether `teacher` is a teacher name or None.

    `uses_logit_scale` and `head_modalities` say which trainable parameters the term reaches, so the trainer can
    freeze what no configured term reaches (DDP then needs no `find_unused_parameters`).
    """

    uses_teachers = True
    uses_logit_scale = True  # reads the student's logit scale
    gathers_teachers = False  # reads the teachers' features of the global batch (gathered across processes)
    uses_tokens = False  # reads patch tokens (the student's adapted ones, the teachers' cached ones): spatial.py
    batch_inputs: tuple[str, ...] = ()  # named per-row batch inputs it reads (distill.data.inputs, ctx.batch_input)

    @property
    def uses_domains(self) -> bool:
        """Whether the term reads each row's domain (`scope: domain`): the batch must carry domain ids."""
        return False

    def head_modalities(self) -> tuple[Modality, ...]:
        """The student projection heads (per teacher) this term reads."""
        return ()

    def student_modalities(self) -> tuple[Modality, ...]:
        """The student towers whose output this term reads (directly or through a head)."""
        return MODALITIES

    def reads_logit_bias(self, sigmoid_teachers: Collection[str]) -> bool:
        """Whether the term reads the student's logit bias, given those of its teachers that have a bias."""
        return False

    def per_sample(self, ctx: StepContext, teacher: str | None) -> Tensor:  # (B,)
        raise NotImplementedError


@register_loss(key="infonce")
class InfoNCE(LossTerm):
    """CLIP's symmetric InfoNCE with the student's logit scale, sharded: local rows vs the gathered global batch.

    positives: "diagonal" (CLIP: only row i's own pair is positive) or "caption" (every row with the same caption
    string is a positive, the target uniform over them: UniCL/SupCon-style, for corpora of templated captions
    where identical captions would otherwise be false negatives; needs `caption_ids`).
    """

    uses_teachers = False

    def __init__(self, positives: Positives = "diagonal"):
        super().__init__()
        self.positives = _check_positives("infonce", positives)

    def per_sample(self, ctx: StepContext, teacher: str | None = None) -> Tensor:
        img, txt = ctx.student_feats(Modality.IMAGE), ctx.student_feats(Modality.TEXT)
        all_img, offset = ctx.student_global(Modality.IMAGE)
        all_txt, _ = ctx.student_global(Modality.TEXT)
        i2t = ctx.contrastive(ctx.scale * img @ all_txt.T, offset, self.positives)
        t2i = ctx.contrastive(ctx.scale * txt @ all_img.T, offset, self.positives)
        return (i2t + t2i) / 2


@register_loss(key="feature")
class FeatureMatch(LossTerm):
    """Projected student features vs cached teacher features, image and text averaged.

    metric: "cosine" (1 - cos), "mse" (mean over dims; MMKD-CLIP uses it with weight 50), "smooth_l1" (beta).
    The projection is L2-normalised first, like the teacher features, except under PHI-S balancing, where the
    targets are standardised (per-dim variance 1, not unit norm) and the head regresses them directly.
    """

    METRICS = ("cosine", "mse", "smooth_l1")

    def __init__(
        self, metric: FeatureMetric = "cosine", modalities: tuple[str, ...] | list[str] = MODALITIES, beta: float = 1.0
    ):
        super().__init__()
        if metric not in self.METRICS:
            raise ValueError(f"feature metric {metric!r} is unknown; use one of {', '.join(self.METRICS)}")
        bad = [m for m in modalities if m not in MODALITIES]
        if bad or not modalities:
            raise ValueError(
                f"feature modalities must be a non-empty subset of "
                f"{tuple(m.value for m in MODALITIES)}, got {modalities!r}"
            )
        self.metric, self.modalities, self.beta = metric, tuple(Modality(m) for m in modalities), float(beta)

    uses_logit_scale = False

    def head_modalities(self) -> tuple[Modality, ...]:
        return self.modalities

    def student_modalities(self) -> tuple[Modality, ...]:
        return self.modalities

    def per_sample(self, ctx: StepContext, teacher: str | None) -> Tensor:
        teacher = _named(teacher)
        vals = []
        for m in self.modalities:
            y = ctx.feature_target(teacher, m)
            p = ctx.projected(teacher, m, y.shape[-1])
            if ctx.phi_s is None:
                p = F.normalize(p, dim=-1)
            if self.metric == "cosine":
                vals.append(1 - F.cosine_similarity(p, y, dim=-1))
            elif self.metric == "mse":
                vals.append(((p - y) ** 2).mean(-1))
            else:
                vals.append(F.smooth_l1_loss(p, y, reduction="none", beta=self.beta).mean(-1))
        return torch.stack(vals).mean(0)


@register_loss(key="icl")
class InteractiveContrastive(LossTerm):
    """Cross-modal InfoNCE with the teacher's embeddings as the other side (CLIP-KD's ICL, used by MMKD-CLIP).

    Student image (projected to the teacher's dim, normalised) vs the teacher's texts of the global batch, and
    student text vs teacher images, both with the student's logit scale; the two directions are averaged.
    positives: "diagonal" or "caption" (identical captions have identical teacher text embeddings, so every row
    with the same caption is a positive; see InfoNCE).
    """

    gathers_teachers = True

    def __init__(self, positives: Positives = "diagonal"):
        super().__init__()
        self.positives = _check_positives("icl", positives)

    def head_modalities(self) -> tuple[Modality, ...]:
        return MODALITIES

    def per_sample(self, ctx: StepContext, teacher: str | None) -> Tensor:
        teacher = _named(teacher)
        vals = []
        for mine, other in CROSS:
            all_t, offset = ctx.teacher_global(teacher, other)
            p = F.normalize(ctx.projected(teacher, mine, all_t.shape[-1]), dim=-1)
            vals.append(ctx.contrastive(ctx.scale * p @ all_t.T, offset, self.positives))
        return (vals[0] + vals[1]) / 2


@register_loss(key="affinity")
class Affinity(LossTerm):
    """Match the student's image-text similarity distribution to the teacher's (open_clip's DistillClipLoss).

    Rows of softmax(student scale * img @ txt^T) against the teacher's rows (teacher's own logit scale), image->text
    and text->image averaged. Cross-entropy by default (as DistillClipLoss, MobileCLIP); kl=True subtracts the
    teacher's entropy so the value is 0 at a perfect match (same gradients).
    A sigmoid teacher (one with a logit bias b_t, e.g. MedSigLIP) scores each pair on its own, not a row: its
    targets are sigmoid(s_t * img @ txt^T + b_t), matched by the student's sigmoid(s * img @ txt^T + b) with the
    student's own scale and bias, as a binary cross-entropy per pair summed over the row's pairs (SigLIP's
    normalisation), both directions averaged; kl=True subtracts the teacher's binary entropies.

    scope: "batch" (default) or "domain": a row's distributions, student's and teacher's, span only the global
    batch's rows of its own domain (`TeacherBatch.domains`, from data.domain_column; other columns are masked to
    -inf before both softmaxes), so a breast row is distilled toward its teacher's view of breast captions alone.
    A row alone in its domain in the batch then contributes 0 (a one-point distribution). A sigmoid teacher's
    per-pair sum drops the other domains' pairs (a row alone keeps its own pair).
    positives: "diagonal" (default) or "caption": columns with the same caption id form one class, and both
    distributions are over those classes (a class's probability: the sum over its columns), so the student is not
    asked to reproduce how the teacher splits mass among copies of one caption (needs caption ids). A sigmoid
    teacher scores each pair alone (no class competes), so its pairs are unchanged.
    pairs: "cross" (default: image-text, as above), "intra" or "both": "intra" matches the image-image and
    text-text distributions instead (each row over the other global rows of its modality, itself excluded, with the
    same scales; relational distillation): the teacher's view of which images look alike, which says more about a
    domain with a few templated captions than its image-caption rows do. "both" averages the four directions.
    `positives` applies to the cross pairs only.
    """

    gathers_teachers = True

    def __init__(
        self,
        kl: bool = False,
        scope: Scope = "batch",
        positives: Positives = "diagonal",
        pairs: AffinityPairs = "cross",
    ):
        super().__init__()
        self.kl = bool(kl)
        self.scope = _check_scope("affinity", scope)
        self.positives = _check_positives("affinity", positives)
        self.pairs = _check_choice("affinity", "pairs", pairs, AFFINITY_PAIRS)

    @property
    def uses_domains(self) -> bool:
        return self.scope == "domain"

    def reads_logit_bias(self, sigmoid_teachers: Collection[str]) -> bool:
        return bool(sigmoid_teachers)

    def per_sample(self, ctx: StepContext, teacher: str | None) -> Tensor:
        teacher = _named(teacher)
        t_scale, t_bias = ctx.teacher_scale(teacher), ctx.teacher_bias(teacher)
        keep = ctx.domain_keep() if self.scope == "domain" else None
        classes = ctx.caption_classes() if self.positives == "caption" and t_bias is None else None
        directions = (CROSS if self.pairs != "intra" else ()) + (INTRA if self.pairs != "cross" else ())
        vals = []
        for mine, other in directions:
            all_s, offset = ctx.student_global(other)
            all_t, _ = ctx.teacher_global(teacher, other)
            s_logits = ctx.scale * ctx.student_feats(mine) @ all_s.T
            t_logits = t_scale * ctx.teacher(teacher, mine) @ all_t.T
            cols, cls = keep, classes
            if mine == other:  # a row's own column is not a pair; caption classes are a cross-modal notion
                others = ctx.not_self(offset, all_s.shape[0])
                cols, cls = (others if keep is None else keep & others), None
            if t_bias is not None:
                vals.append(_sigmoid_ce(t_logits + t_bias, s_logits + ctx.student_bias(), self.kl, cols))
            elif cols is None and cls is None:  # scope batch, positives diagonal: open_clip's DistillClipLoss
                vals.append(_soft_ce(t_logits, s_logits, self.kl))
            else:
                vals.append(_local_soft_ce(t_logits, s_logits, self.kl, cols, cls))
        return cast(Tensor, sum(vals)) / len(vals)  # sum() of tensors is a tensor
