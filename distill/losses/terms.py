"""The loss terms, registered by kind: infonce, feature, icl, affinity (siglip is in siglip.py).

Each term returns PER-SAMPLE values (B,) for this process's rows, for one teacher (or none); `DistillLoss` weights
and averages them (see combine.py). The contrastive-type terms score local rows against the global batch
gathered across processes (see distributed.py), so their batch mean, averaged over ranks, is the one-process value.
All maths runs in float32 whatever the autocast dtype of the inputs.
"""
from __future__ import annotations

import math
from typing import Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from teachers.modality import MODALITIES, Modality
from teachers.plugin_registry import Registry

from .distributed import StepGather
from .phi_s import PhiS
from .types import StudentOutput, TeacherBatch

LOSSES: Registry[type["LossTerm"]] = Registry("loss", entry_point_group="biomed_distill.losses")
register_loss = LOSSES.register
MAX_LOGIT_SCALE = 100.0
POSITIVES = ("diagonal", "caption")  # contrastive targets: each row's own pair | every row with the same caption
SCOPES = ("batch", "domain")  # what a row's similarity distribution spans: the global batch | its own domain's rows
CROSS = ((Modality.IMAGE, Modality.TEXT), (Modality.TEXT, Modality.IMAGE))  # (mine, other): both directions


class StepContext:
    """One step's inputs with checked, float32 accessors, memoised cross-process gathers and PHI-S targets."""

    def __init__(
        self, student: StudentOutput, teachers: TeacherBatch | None, gather: StepGather, phi_s: PhiS | None = None,
        caption_ids: Tensor | None = None, gathered_teachers: list[str] | None = None, gathers_ids: bool = True,
        gathers_domains: bool = False,
    ):
        self.student = student
        self.teachers = teachers
        self.gather = gather
        self.phi_s = phi_s
        self.caption_ids = caption_ids  # (B,) int64 caption identities (TrainBatch.caption_ids), or None
        self.batch_size = student.image.shape[0]
        self.scale = student.logit_scale.float().clamp(max=MAX_LOGIT_SCALE)
        self._log_conf: dict[str, Tensor] = {}
        self._caption_targets: Tensor | None = None
        self._memo: dict[str, object] = {}  # domain_keep, caption_same, caption_classes
        # what the step's ONE no-gradient gather sends (see `_constants`): these teachers' features (None: every
        # teacher in the batch) and, when `gathers_ids` / `gathers_domains`, the caption ids / domain ids
        self._gathered_teachers, self._gathers_ids = gathered_teachers, gathers_ids
        self._gathers_domains = gathers_domains

    def labels(self, offset: int) -> Tensor:
        return torch.arange(self.batch_size, device=self.student.image.device) + offset

    def caption_targets(self) -> Tensor:
        """(B, world * B) float32 soft targets of `positives: caption`, memoised for the step.

        Row i is uniform over the global rows whose caption id equals row i's (itself included), so it sums to 1;
        with all captions distinct it is the one-hot of the diagonal. Caption ids are gathered without gradient.
        """
        if self._caption_targets is None:
            ids = self._local_ids()
            if ids is None:
                raise ValueError(
                    "a loss term has positives='caption', but the batch carries no caption ids: pass "
                    "caption_ids=batch.caption_ids ((B,) int64, distill.data.Collate computes them) to DistillLoss"
                )
            ids = ids[:, 0]
            with torch.no_grad():
                all_ids, _ = self._constants(["caption_ids"])["caption_ids"]
                same = (ids[:, None] == all_ids.reshape(1, -1)).float()
                self._caption_targets = same / same.sum(1, keepdim=True)
        return self._caption_targets

    def caption_same(self) -> Tensor:
        """(B, world * B) bool: global row j has local row i's caption (itself included); memoised."""
        if "caption_same" not in self._memo:
            targets = self.caption_targets()
            self._memo["caption_same"] = targets > 0
        return self._memo["caption_same"]

    def caption_classes(self) -> tuple[Tensor, int]:
        """((world * B,) int64 class of each global row, number of classes): rows with equal caption ids share a
        class (`positives: caption` in affinity: the distributions are over captions, not rows); memoised."""
        if "caption_classes" not in self._memo:
            self.caption_targets()  # checks and gathers the ids
            all_ids, _ = self._constants(["caption_ids"])["caption_ids"]
            uniq, classes = torch.unique(all_ids.reshape(-1), return_inverse=True)
            self._memo["caption_classes"] = (classes.reshape(-1), int(uniq.numel()))
        return self._memo["caption_classes"]

    def domain_keep(self) -> Tensor:
        """(B, world * B) bool: global row j is in local row i's domain (itself included), for `scope: domain`;
        domain ids are gathered without gradient, in the step's one no-gradient gather. Memoised."""
        if "domain_keep" not in self._memo:
            if self.domains is None:
                raise ValueError(
                    "a loss term (or loss.combine) has scope='domain', but the batch carries no domain ids: pass "
                    "TeacherBatch.domains ((B,) int64, from the corpus column data.domain_column) to DistillLoss"
                )
            mine = self._local_domains()
            with torch.no_grad():
                all_dom, _ = self._constants(["domains"])["domains"]
                self._memo["domain_keep"] = mine == all_dom.reshape(1, -1)
        return self._memo["domain_keep"]

    def row_weights(self) -> Tensor | None:
        """(B,) float32 per-row multipliers of the teacher terms (`loss.routing.weights`), None: all 1."""
        w = None if self.teachers is None else self.teachers.row_weights
        if w is None:
            return None
        w = w.reshape(-1).to(device=self.student.image.device, dtype=torch.float32)
        if w.shape[0] != self.batch_size:
            raise ValueError(f"row_weights has {w.shape[0]} rows; expected {self.batch_size}")
        return w

    @property
    def domains(self) -> Tensor | None:
        return None if self.teachers is None else self.teachers.domains

    def _local_domains(self) -> Tensor:
        """(B, 1) int64 domain ids on the device, checked."""
        ids = self.domains.reshape(-1).to(device=self.student.image.device, dtype=torch.int64)
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"domains has {ids.shape[0]} rows; expected {self.batch_size}")
        return ids[:, None]

    def contrastive(self, logits: Tensor, offset: int, positives: str) -> Tensor:
        """(B,) cross-entropy of local rows' logits over the global batch: the diagonal label, or caption targets."""
        if positives == "caption":
            return F.cross_entropy(logits, self.caption_targets().to(logits.dtype), reduction="none")
        return F.cross_entropy(logits, self.labels(offset), reduction="none")

    def student_feats(self, modality: Modality) -> Tensor:
        return getattr(self.student, Modality(modality).value).float()

    def student_global(self, modality: Modality) -> tuple[Tensor, int]:
        return self.gather(f"student/{modality}", self.student_feats(modality), True)

    def teacher(self, name: str, modality: Modality) -> Tensor:
        if self.teachers is None:
            raise ValueError(
                f"a loss term needs cached features of teacher {name!r}, but the batch has no teacher features "
                "(cache them with `distill cache` and set data.features, or use only the infonce term)"
            )
        if name not in self.teachers.feats:
            raise KeyError(
                f"the batch has no features for teacher {name!r}; it has {sorted(self.teachers.feats) or 'none'}"
            )
        y = self.teachers.feats[name][modality]
        if y.dim() != 2 or y.shape[0] != self.batch_size:
            raise ValueError(
                f"teacher {name!r} {modality} features have shape {tuple(y.shape)}; expected ({self.batch_size}, D), "
                "one row per student row (for a cache with augmented views, pick one view per row when loading)"
            )
        return y.to(self.student.image.device).float()

    def teacher_global(self, name: str, modality: Modality) -> tuple[Tensor, int]:
        key = f"teacher/{name}/{modality}"
        return self._constants([key], name)[key]

    def _local_ids(self) -> Tensor | None:
        """(B, 1) int64 caption ids on the device, checked; None when the batch has none."""
        if self.caption_ids is None:
            return None
        ids = self.caption_ids.reshape(-1).to(device=self.student.image.device, dtype=torch.int64)
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"caption_ids has {ids.shape[0]} rows; expected {self.batch_size}")
        return ids[:, None]

    def _constants(self, keys: list[str], teacher: str | None = None) -> dict[str, tuple[Tensor, int]]:
        """The gathered no-gradient inputs: the first call sends ALL of the step's (every gathered teacher's
        features and the caption ids) in one collective, concatenated; a later miss (a teacher outside
        `gathered_teachers`) costs one more. Every rank asks for the same keys in the same order."""
        if all(self.gather.has(k) for k in keys):
            return self.gather.constants({k: None for k in keys})
        names = self._gathered_teachers
        if names is None:
            names = list(self.teachers.feats) if self.teachers is not None else []
        names = list(names) + ([teacher] if teacher is not None and teacher not in names else [])
        parts = {f"teacher/{n}/{m}": self.teacher(n, m) for n in names for m in MODALITIES}
        ids = self._local_ids() if self._gathers_ids or "caption_ids" in keys else None
        if ids is not None:
            parts["caption_ids"] = ids
        if (self._gathers_domains or "domains" in keys) and self.domains is not None:
            parts["domains"] = self._local_domains()
        out = self.gather.constants(parts)
        return {k: out[k] for k in keys}

    def teacher_scale(self, name: str) -> float:
        if self.teachers is None or name not in self.teachers.logit_scale:
            raise KeyError(f"the batch has no logit scale for teacher {name!r} (the cache attr `logit_scale`)")
        return float(self.teachers.logit_scale[name])

    def teacher_bias(self, name: str) -> float | None:
        """Teacher `name`'s logit bias (a sigmoid teacher's, the cache attr `logit_bias`); None for softmax ones."""
        return None if self.teachers is None else self.teachers.logit_bias.get(name)

    def student_bias(self) -> Tensor:
        """The student's logit bias in float32, for the sigmoid terms; a one-line error when the student has none."""
        if self.student.logit_bias is None:
            raise ValueError("a sigmoid loss term (siglip, or affinity from a teacher with a logit bias) needs the "
                             "student's logit bias, but the student has none: build it with "
                             "student.overrides.init_logit_bias (distill train does so for such a loss)")
        return self.student.logit_bias.float()

    def projected(self, name: str, modality: Modality, dim: int) -> Tensor:
        heads = self.student.projected.get(name)
        if heads is None:
            raise KeyError(
                f"the student has no {modality} projection head for teacher {name!r}; "
                f"it has {sorted(self.student.projected) or 'none'} (build ProjectionHeads with every teacher)"
            )
        p = heads[modality].float()
        if p.shape[-1] != dim:
            raise ValueError(
                f"student projection for teacher {name!r} ({modality}) has dim {p.shape[-1]}, but the teacher's "
                f"features have dim {dim}: the projection heads were built for another cache"
            )
        return p

    def log_confidence(self, name: str, scope: str = "batch", positives: str = "diagonal") -> Tensor:
        """(B,) float64 log p_i of teacher `name`'s own confidence in each local pair, memoised for the step.

        p_i = (softmax_j(s_t * img_i . txt_j)[i] + softmax_j(s_t * txt_i . img_j)[i]) / 2 over the global batch
        (teacher features gathered across processes without gradient), s_t the teacher's logit scale.
        scope "domain": the softmax spans the rows of row i's domain only (a row alone in its domain: p_i = 1).
        positives "caption": p_i is the softmax mass on every row with row i's caption, not on row i alone.
        """
        key = name if (scope, positives) == ("batch", "diagonal") else f"{name}/{scope}/{positives}"
        if key not in self._log_conf:
            with torch.no_grad():
                s = self.teacher_scale(name)
                keep = self.domain_keep() if scope == "domain" else None
                same = self.caption_same() if positives == "caption" else None
                lps = []
                for mine, other in CROSS:
                    all_o, offset = self.teacher_global(name, other)
                    logits = s * self.teacher(name, mine).double() @ all_o.double().T
                    if keep is not None:
                        logits = logits.masked_fill(~keep, float("-inf"))
                    lp = logits.log_softmax(-1)
                    if same is None:
                        lps.append(lp.gather(1, self.labels(offset)[:, None]).squeeze(1))
                    else:
                        lps.append(lp.masked_fill(~same, float("-inf")).logsumexp(-1))
                self._log_conf[key] = torch.logaddexp(lps[0], lps[1]) - math.log(2.0)
        return self._log_conf[key]

    def route(self, names: list[str]) -> Tensor | None:
        """(B, T) bool route mask for these teachers (in this order), None when the batch is not routed."""
        r = None if self.teachers is None else self.teachers.route
        if r is None:
            return None
        missing = [t for t in names if t not in r]
        if missing:
            raise KeyError(f"the batch's route mask has no entry for teacher(s) {missing}; it has {sorted(r)}")
        out = torch.stack([r[t].to(torch.bool).reshape(-1) for t in names], dim=1)
        if out.shape[0] != self.batch_size:
            raise ValueError(f"the route mask has {out.shape[0]} rows; expected {self.batch_size}")
        return out

    def feature_target(self, name: str, modality: Modality) -> Tensor:
        """The teacher features a feature term regresses to: PHI-S standardised when balancing is on."""
        y = self.teacher(name, modality)
        return self.phi_s(y, name, modality) if self.phi_s is not None else y


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


def _local_soft_ce(teacher_logits: Tensor, student_logits: Tensor, kl: bool, keep: Tensor | None,
                   classes: tuple[Tensor, int] | None) -> Tensor:
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


def _check_positives(kind: str, positives: str) -> str:
    if positives not in POSITIVES:
        raise ValueError(f"{kind} positives {positives!r} is unknown; use one of {', '.join(POSITIVES)}")
    return positives


def _check_scope(kind: str, scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"{kind} scope {scope!r} is unknown; use one of {', '.join(SCOPES)}")
    return scope


class LossTerm(nn.Module):
    """A term computed per sample; `uses_teachers` says whether `teacher` is a teacher name or None.

    `uses_logit_scale` and `head_modalities` say which trainable parameters the term reaches, so the trainer can
    freeze what no configured term reaches (DDP then needs no `find_unused_parameters`).
    """

    uses_teachers = True
    uses_logit_scale = True  # reads the student's logit scale
    gathers_teachers = False  # reads the teachers' features of the global batch (gathered across processes)
    uses_tokens = False  # reads patch tokens (the student's adapted ones, the teachers' cached ones): spatial.py
    uses_domains = False  # reads each row's domain (`scope: domain`): the batch must carry domain ids

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

    def __init__(self, positives: str = "diagonal"):
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

    def __init__(self, metric: str = "cosine", modalities: tuple[str, ...] | list[str] = MODALITIES, beta: float = 1.0):
        super().__init__()
        if metric not in self.METRICS:
            raise ValueError(f"feature metric {metric!r} is unknown; use one of {', '.join(self.METRICS)}")
        bad = [m for m in modalities if m not in MODALITIES]
        if bad or not modalities:
            raise ValueError(f"feature modalities must be a non-empty subset of "
                             f"{tuple(m.value for m in MODALITIES)}, got {modalities!r}")
        self.metric, self.modalities, self.beta = metric, tuple(Modality(m) for m in modalities), float(beta)

    uses_logit_scale = False

    def head_modalities(self) -> tuple[Modality, ...]:
        return self.modalities

    def student_modalities(self) -> tuple[Modality, ...]:
        return self.modalities

    def per_sample(self, ctx: StepContext, teacher: str | None) -> Tensor:
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

    def __init__(self, positives: str = "diagonal"):
        super().__init__()
        self.positives = _check_positives("icl", positives)

    def head_modalities(self) -> tuple[Modality, ...]:
        return MODALITIES

    def per_sample(self, ctx: StepContext, teacher: str | None) -> Tensor:
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
    """

    gathers_teachers = True

    def __init__(self, kl: bool = False, scope: str = "batch", positives: str = "diagonal"):
        super().__init__()
        self.kl = bool(kl)
        self.scope = _check_scope("affinity", scope)
        self.positives = _check_positives("affinity", positives)

    @property
    def uses_domains(self) -> bool:
        return self.scope == "domain"

    def reads_logit_bias(self, sigmoid_teachers: Collection[str]) -> bool:
        return bool(sigmoid_teachers)

    def per_sample(self, ctx: StepContext, teacher: str | None) -> Tensor:
        t_scale, t_bias = ctx.teacher_scale(teacher), ctx.teacher_bias(teacher)
        keep = ctx.domain_keep() if self.scope == "domain" else None
        classes = ctx.caption_classes() if self.positives == "caption" and t_bias is None else None
        vals = []
        for mine, other in CROSS:
            all_s, _ = ctx.student_global(other)
            all_t, _ = ctx.teacher_global(teacher, other)
            s_logits = ctx.scale * ctx.student_feats(mine) @ all_s.T
            t_logits = t_scale * ctx.teacher(teacher, mine) @ all_t.T
            if t_bias is not None:
                vals.append(_sigmoid_ce(t_logits + t_bias, s_logits + ctx.student_bias(), self.kl, keep))
            elif keep is None and classes is None:  # scope batch, positives diagonal: open_clip's DistillClipLoss
                vals.append(_soft_ce(t_logits, s_logits, self.kl))
            else:
                vals.append(_local_soft_ce(t_logits, s_logits, self.kl, keep, classes))
        return (vals[0] + vals[1]) / 2
