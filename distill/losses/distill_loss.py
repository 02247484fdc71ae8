"""`DistillLoss`: the weighted sum of named terms that the trainer calls once per step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from distill.losses import combine as _combine
from distill.losses.distributed import GatherFn, StepGather, all_gather_rows
from distill.losses.phi_s import PhiS
from distill.losses.spec import CombineCfg, LossTermCfg, build_term
from distill.losses.terms import LossTerm, StepContext
from distill.losses.types import StudentOutput, TeacherBatch
from teachers.kernel.modality import MODALITIES, Modality


class DistillLoss(nn.Module):
    """Builds the configured terms and returns {term name: weight * term, ..., "loss": total} each step.

    teacher_names: the teachers in the cache (the student has one projection head per teacher).
    combine: weighted sum, one random teacher per sample, or label-free confidence weights; teacher dropping,
        PHI-S balancing (see combine.py). `TeacherBatch.route` restricts each row to its routed teachers.
        `forward`'s generator drives the random choices: seed it identically on every rank, per step.
    teacher_stats: cache statistics for balance="phi_s": {teacher: {"image_mean", "image_cov", "text_mean",
        "text_cov"}} as numpy arrays. PHI-S standardises the targets of `feature` terms only: `icl` and `affinity`
        compare unit vectors through the teacher's logit scale, which a centred, rescaled target would break.
    gather_fn: how rows are gathered across processes, (x, with_grad) -> (global rows, offset of the local ones);
        default: torch.distributed when it is initialised, else the identity (plain one-process losses).
    `forward`'s caption_ids ((B,) int64, `TrainBatch.caption_ids`) say which rows share a caption: terms with
        `positives: caption` (infonce, icl, affinity; loss.combine.positives) need them; other terms ignore them.
    `forward`'s inputs ({name: (B, ...) tensor or {key: tensor}}, `TrainBatch.inputs`): the named batch inputs
        that terms declare in `batch_inputs` and read with `StepContext.batch_input` (`distill.data.inputs`).
    `TeacherBatch.domains` ((B,) int64) feed `scope: domain` (affinity, loss.combine.scope);
        `TeacherBatch.row_weights` ((B,) float, loss.routing.weights) multiply each row's teacher terms, not InfoNCE.
    """

    def __init__(
        self,
        terms: list[LossTermCfg],
        teacher_names: list[str],
        combine: CombineCfg = CombineCfg(),  # noqa: B008 (a frozen config model: one shared default is safe)
        teacher_stats: dict[str, dict[str, np.ndarray]] | None = None,
        gather_fn: GatherFn | None = None,
    ):
        super().__init__()
        names = [t.label for t in terms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"loss term names must be unique; repeated: {', '.join(dupes)}")
        self.teacher_names = list(teacher_names)
        self.combine_cfg = combine
        self.gather_fn = gather_fn or all_gather_rows
        self.cfgs = {t.label: t for t in terms if t.weight > 0}
        if not self.cfgs:
            raise ValueError("no loss term has a weight > 0; give at least one term a positive weight")
        self.terms = nn.ModuleDict({name: build_term(name, cfg.kind, cfg.kwargs) for name, cfg in self.cfgs.items()})
        self.teacher_weights: dict[str, dict[str, float]] = {}
        for name, cfg in self.cfgs.items():
            term = self.term(name)
            if not term.uses_teachers:
                if cfg.teachers is not None:
                    raise ValueError(f"loss term {name!r} (kind {cfg.kind!r}) uses no teachers; remove `teachers`")
                continue
            if not self.teacher_names:
                raise ValueError(f"loss term {name!r} (kind {cfg.kind!r}) needs teachers, but none are given")
            given = cfg.teachers if cfg.teachers is not None else {t: 1.0 for t in self.teacher_names}
            unknown = [t for t in given if t not in self.teacher_names]
            if unknown:
                raise KeyError(
                    f"loss term {name!r} names teacher(s) {', '.join(map(repr, unknown))} that are not in the "
                    f"cache; the teachers are: {', '.join(self.teacher_names)}"
                )
            self.teacher_weights[name] = {t: float(w) for t, w in given.items() if w > 0}
        self.phi_s: PhiS | None = None
        if combine.balance == "phi_s":
            featured = sorted({t for n, w in self.teacher_weights.items() if self.cfgs[n].kind == "feature" for t in w})
            if teacher_stats is None:
                raise ValueError("balance='phi_s' needs teacher_stats (the cache's per-teacher mean and covariance)")
            self.phi_s = PhiS(teacher_stats, featured)

    def term(self, name: str) -> LossTerm:
        """The built term `name` (typed: nn.ModuleDict hands back plain Modules)."""
        return cast(LossTerm, self.terms[name])

    def named_terms(self) -> list[tuple[str, LossTerm]]:
        """(name, term) for every built term, in config order."""
        return [(name, cast(LossTerm, term)) for name, term in self.terms.items()]

    @property
    def uses_logit_scale(self) -> bool:
        """Whether any term reads the student's logit scale (a feature-only loss does not)."""
        return any(t.uses_logit_scale for _, t in self.named_terms())

    def uses_logit_bias(self, teacher_biases: Mapping[str, float | None]) -> bool:
        """Whether some term reads the student's logit bias: siglip, or affinity from a teacher with a bias
        (`teacher_biases`: teacher -> its logit bias, None or absent for a softmax teacher)."""
        return any(
            term.reads_logit_bias([t for t in self.teacher_weights.get(n, {}) if teacher_biases.get(t) is not None])
            for n, term in self.named_terms()
        )

    def student_modalities(self) -> tuple[Modality, ...]:
        """The student towers some term reads; an image-only feature loss reads no text."""
        used = {m for _, t in self.named_terms() for m in t.student_modalities()}
        return tuple(m for m in MODALITIES if m in used)

    def head_modalities(self) -> dict[str, tuple[Modality, ...]]:
        """{teacher: modalities} of the student projection heads that some term reads (affinity reads none)."""
        used: dict[str, set[Modality]] = {}
        for name, term in self.named_terms():
            for t in self.teacher_weights.get(name, {}):
                used.setdefault(t, set()).update(term.head_modalities())
        return {t: tuple(m for m in MODALITIES if m in ms) for t, ms in used.items() if ms}

    def __str__(self) -> str:
        return "Loss = " + " + ".join(f"{float(c.weight)!r} * {n}" for n, c in self.cfgs.items())

    def draw(self, batch_size: int, generator: torch.Generator | None = None) -> _combine.TeacherDraw:
        """The step's random teacher choices (what `forward` draws first from `generator`)."""
        return _combine.draw(
            self.combine_cfg,
            self.teacher_names,
            [list(w) for w in self.teacher_weights.values()],
            batch_size,
            generator,
        )

    @property
    def uses_caption_ids(self) -> bool:
        """Whether some term (or the confidence weights) treats rows with the same caption as positives (then
        forward needs caption_ids)."""
        return (
            any(getattr(t, "positives", "diagonal") == "caption" for _, t in self.named_terms())
            or self._confidence_option("positives") != "diagonal"
        )

    @property
    def uses_domains(self) -> bool:
        """Whether some term (or the confidence weights) has `scope: domain` (then TeacherBatch needs domains)."""
        return any(t.uses_domains for n, t in self.named_terms() if n in self.teacher_weights) or (
            bool(self.teacher_weights) and self._confidence_option("scope") != "batch"
        )

    def _confidence_option(self, key: str) -> str:
        """loss.combine.scope / positives where they apply (mode confidence), else the default."""
        default = {"scope": "batch", "positives": "diagonal"}[key]
        return getattr(self.combine_cfg, key) if self.combine_cfg.mode == "confidence" else default

    def gathered_teachers(self) -> list[str]:
        """The teachers whose features the step gathers across processes, all in one collective: those of the
        terms that read the global batch's teacher features, and every weighted teacher under confidence weights."""
        conf = self.combine_cfg.mode == "confidence"
        used = {t for n, w in self.teacher_weights.items() if conf or self.term(n).gathers_teachers for t in w}
        return [t for t in self.teacher_names if t in used]

    def batch_inputs(self) -> dict[str, list[str]]:
        """{batch input name: the terms that read it}: the named per-row inputs (`distill.data.inputs`) the batches
        must carry, from each term's `batch_inputs` (a tuple of names; none by default)."""
        wanted: dict[str, list[str]] = {}
        for name, term in self.named_terms():
            for key in getattr(term, "batch_inputs", ()):
                wanted.setdefault(key, []).append(name)
        return wanted

    def token_teachers(self) -> list[str]:
        """The teachers whose cached patch tokens some term reads (`spatial`), in cache order: the batches must
        carry their tokens and the student needs a token adaptor for each."""
        used = {t for n, w in self.teacher_weights.items() if self.term(n).uses_tokens for t in w}
        return [t for t in self.teacher_names if t in used]

    def forward(
        self,
        student: StudentOutput,
        teachers: TeacherBatch | None,
        generator: torch.Generator | None = None,
        caption_ids: Tensor | None = None,
        inputs: Mapping[str, Any] | None = None,
    ) -> dict[str, Tensor]:
        ctx = StepContext(
            student,
            teachers,
            StepGather(self.gather_fn),
            self.phi_s,
            caption_ids,
            gathered_teachers=self.gathered_teachers(),
            gathers_ids=self.uses_caption_ids,
            gathers_domains=self.uses_domains,
            inputs=inputs,
        )
        step = self.draw(ctx.batch_size, generator) if self.teacher_weights else None
        scope, positives = self._confidence_option("scope"), self._confidence_option("positives")
        row_w = ctx.row_weights() if self.teacher_weights else None
        out: dict[str, Tensor] = {}
        for name, term in self.named_terms():
            if not term.uses_teachers:
                value = term.per_sample(ctx, None).mean()
            else:
                if step is None:  # unreachable: a term that uses teachers has teacher weights, so step was drawn
                    raise RuntimeError(f"loss term {name!r} uses teachers but no teacher draw was made this step")
                weights = self.teacher_weights[name]
                per = torch.stack([term.per_sample(ctx, t) for t in weights], dim=1)  # (B, T)
                names = list(weights)
                conf = (
                    torch.stack([ctx.log_confidence(t, scope, positives) for t in names], dim=1)
                    if self.combine_cfg.mode == "confidence"
                    else None
                )
                mix = _combine.weight_matrix(
                    self.combine_cfg,
                    weights,
                    step,
                    ctx.batch_size,
                    per.device,
                    route=ctx.route(names),
                    log_confidence=conf,
                )
                # mean over ALL local rows (unrouted rows count 0): equal across processes, no extra collective
                rows = (mix * per).sum(1)
                value = (rows if row_w is None else rows * row_w).mean()
            out[name] = self.cfgs[name].weight * value
        out["loss"] = torch.stack(list(out.values())).sum()
        return out
