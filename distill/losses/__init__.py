"""Training losses: sharded InfoNCE and SigLIP, feature matching, ICL and affinity distillation, teacher combination,
PHI-S.

    loss = DistillLoss([LossTermCfg("infonce", "infonce"), LossTermCfg("feat_mse", "feature", 50.0,
                        kwargs={"metric": "mse"})], teacher_names=["biomedclip", "plip"])
    out = loss(StudentOutput(...), TeacherBatch(...), generator)   # {"infonce": ..., "feat_mse": ..., "loss": ...}
    print(loss)                                                      # Loss = 1.0 * infonce + 50.0 * feat_mse
    # templated captions: LossTermCfg("infonce", "infonce", kwargs={"positives": "caption"}), and pass
    # loss(..., caption_ids=batch.caption_ids): every row with the same caption is a positive
    # domain-local affinity: LossTermCfg("aff", "affinity", kwargs={"scope": "domain"}), with
    # TeacherBatch(..., domains=(B,) int64 ids): each row's distributions span its own domain's rows only
"""

from distill.losses.distill_loss import DistillLoss
from distill.losses.distributed import GatherFn, all_gather_rows
from distill.losses.phi_s import PhiS, hadamard, phi_s_affine
from distill.losses.siglip import SIGLIP_INIT, SigLip
from distill.losses.spatial import Spatial  # registers the `spatial` term
from distill.losses.spec import BALANCE_MODES, COMBINE_MODES, CombineCfg, LossTermCfg, build_term, term_class
from distill.losses.terms import LOSSES, POSITIVES, SCOPES, LossTerm, StepContext, register_loss
from distill.losses.types import StudentOutput, TeacherBatch, teacher_logit_bias

__all__ = [
    "DistillLoss",
    "build_term",
    "POSITIVES",
    "SCOPES",
    "LossTermCfg",
    "CombineCfg",
    "COMBINE_MODES",
    "BALANCE_MODES",
    "term_class",
    "StudentOutput",
    "TeacherBatch",
    "teacher_logit_bias",
    "SigLip",
    "SIGLIP_INIT",
    "LOSSES",
    "LossTerm",
    "Spatial",
    "StepContext",
    "register_loss",
    "GatherFn",
    "all_gather_rows",
    "PhiS",
    "hadamard",
    "phi_s_affine",
]
