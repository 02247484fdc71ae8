"""SigLIP's pairwise sigmoid loss as a student term (Zhai et al. 2023, the loss MedSigLIP was trained with).

Why a term of its own: InfoNCE normalises each row over the batch; the sigmoid loss scores every (image, text)
pair as an independent match-or-not decision with a learnable scale and bias, the other standard objective.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch.nn.functional as F
from torch import Tensor

from distill.config.loss_names import Positives
from distill.losses.terms import LossTerm, StepContext, _check_positives, register_loss
from teachers.kernel.modality import Modality

# SigLIP's initialisation (paper, section 3.3): t' = log 10 (scale 10) and bias -10, so the many negatives start
# near their target and the first steps are not spent pushing them down. `distill train` gives it to a preset
# student whose loss reads a logit bias, unless student.overrides sets these keys.
SIGLIP_INIT = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}


@register_loss(key="siglip")
class SigLip(LossTerm):
    """-sum_j log sigmoid(z_ij * (s * img_i . txt_j + b)) for each local image i over the global batch's texts.

    z_ij = +1 for a positive pair, -1 otherwise; s is the student's logit scale (clamped at 100 like InfoNCE), b
    its learnable logit bias. The local batch mean is open_clip's `SigLipLoss` (its pair sum / local batch), and
    the mean over processes is that loss over the global batch, as with one process.
    Sharded by all-gathering the texts with gradient (the gather InfoNCE uses, memoised: a hybrid run sends it
    once) instead of open_clip's neighbour exchange of text blocks: same value and gradients (the gather's backward
    sums every rank's gradient into the rows' owner), one tested collective; the exchange only saves the memory
    of the gathered (world * B, D) texts, small beside the towers' activations.
    positives: "diagonal" (each image's own caption) or "caption" (every row with the same caption string is a
    positive; needs `caption_ids`, see InfoNCE).
    """

    uses_teachers = False

    def __init__(self, positives: Positives = "diagonal"):
        super().__init__()
        self.positives = _check_positives("siglip", positives)

    def reads_logit_bias(self, sigmoid_teachers: Collection[str] = ()) -> bool:
        return True

    def per_sample(self, ctx: StepContext, teacher: str | None = None) -> Tensor:
        all_txt, offset = ctx.student_global(Modality.TEXT)
        logits = ctx.scale * ctx.student_feats(Modality.IMAGE) @ all_txt.T + ctx.student_bias()
        if self.positives == "caption":
            positive = ctx.caption_targets() > 0
        else:
            positive = F.one_hot(ctx.labels(offset), all_txt.shape[0]).bool()
        signs = positive.to(logits.dtype) * 2 - 1
        return -F.logsigmoid(signs * logits).sum(-1)
