"""One step's inputs for the loss terms (`StepContext`): checked float32 accessors of the student's and teachers'
embeddings, memoised cross-process gathers, caption and domain targets, routing and PHI-S targets.

Why a module of its own: every term (terms.py, siglip.py, spatial.py) reads its inputs through it, and the label-free
confidence weights (combine.py, benchmarks/mt_confidence.py) replay it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.config.loss_names import POSITIVES, SCOPES  # noqa: F401  (re-exported: terms, combine)
from distill.losses.distributed import StepGather
from distill.losses.phi_s import PhiS
from distill.losses.types import StudentOutput, TeacherBatch
from teachers.kernel.modality import MODALITIES, Modality

MAX_LOGIT_SCALE = 100.0
CROSS = ((Modality.IMAGE, Modality.TEXT), (Modality.TEXT, Modality.IMAGE))  # (mine, other): both directions
INTRA = ((Modality.IMAGE, Modality.IMAGE), (Modality.TEXT, Modality.TEXT))  # within one modality


class StepContext:
    """One step's inputs with checked, float32 accessors, memoised cross-process gathers and PHI-S targets."""

    def __init__(
        self,
        student: StudentOutput,
        teachers: TeacherBatch | None,
        gather: StepGather,
        phi_s: PhiS | None = None,
        caption_ids: Tensor | None = None,
        gathered_teachers: list[str] | None = None,
        gathers_ids: bool = True,
        gathers_domains: bool = False,
        inputs: Mapping[str, Any] | None = None,
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
        self.inputs = dict(inputs or {})  # named batch inputs (`TrainBatch.inputs`, distill.data.inputs)

    def batch_input(self, name: str) -> Any:
        """The named batch input `name` on the student's device: a (B, ...) tensor or {key: (B, ...) tensor}; a
        one-line error when the batch lacks it (the term must list it in `batch_inputs`) or its rows are not B."""
        if name not in self.inputs:
            raise KeyError(
                f"a loss term reads the batch input {name!r}, but the batch has "
                f"{sorted(self.inputs) or 'none'}: list it in the term's `batch_inputs` and register its "
                f"producer with distill.data.inputs.register_batch_input(key={name!r})"
            )
        value, device = self.inputs[name], self.student.image.device
        parts = value if isinstance(value, dict) else {None: value}
        for key, v in parts.items():
            if v.shape[0] != self.batch_size:
                label = name if key is None else f"{name}[{key!r}]"
                raise ValueError(f"batch input {label} has {v.shape[0]} rows; expected {self.batch_size}")
        return {k: v.to(device) for k, v in value.items()} if isinstance(value, dict) else value.to(device)

    def labels(self, offset: int) -> Tensor:
        return torch.arange(self.batch_size, device=self.student.image.device) + offset

    def not_self(self, offset: int, columns: int) -> Tensor:
        """(B, columns) bool: every global column but the local row's own (within-modality similarities)."""
        cols = torch.arange(columns, device=self.student.image.device)
        return cols[None, :] != self.labels(offset)[:, None]

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
                    "caption_ids=batch.caption_ids ((B,) int64, distill.data.loader.Collate computes them) to "
                    "DistillLoss"
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
        return cast(Tensor, self._memo["caption_same"])

    def caption_classes(self) -> tuple[Tensor, int]:
        """((world * B,) int64 class of each global row, number of classes): rows with equal caption ids share a
        class (`positives: caption` in affinity: the distributions are over captions, not rows); memoised."""
        if "caption_classes" not in self._memo:
            self.caption_targets()  # checks and gathers the ids
            all_ids, _ = self._constants(["caption_ids"])["caption_ids"]
            uniq, classes = torch.unique(all_ids.reshape(-1), return_inverse=True)
            self._memo["caption_classes"] = (classes.reshape(-1), int(uniq.numel()))
        return cast(tuple[Tensor, int], self._memo["caption_classes"])

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
        return cast(Tensor, self._memo["domain_keep"])

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
        domains = self.domains
        if domains is None:  # callers check first; reshaping None would fail here anyway
            raise AttributeError("the batch carries no domain ids (TeacherBatch.domains)")
        return self._per_row_ids(domains, "domains")

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
        return None if self.caption_ids is None else self._per_row_ids(self.caption_ids, "caption_ids")

    def _per_row_ids(self, ids: Tensor, name: str) -> Tensor:
        """(B, 1) int64 copy of a (B,) id column on the device; a one-line error when its length is not B."""
        ids = ids.reshape(-1).to(device=self.student.image.device, dtype=torch.int64)
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"{name} has {ids.shape[0]} rows; expected {self.batch_size}")
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
        parts: dict[str, Tensor | None] = {f"teacher/{n}/{m}": self.teacher(n, m) for n in names for m in MODALITIES}
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
            raise ValueError(
                "a sigmoid loss term (siglip, or affinity from a teacher with a logit bias) needs the "
                "student's logit bias, but the student has none: build it with "
                "student.overrides.init_logit_bias (distill train does so for such a loss)"
            )
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
