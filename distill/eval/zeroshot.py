"""Zero-shot classification: images against prompt-ensemble class embeddings.

Each class embedding is the mean of its L2-normalised prompt embeddings ("a chest x-ray showing {}", ...),
renormalised (the CLIP recipe). Single-label tasks score softmax(logit_scale * cosine); multi-label tasks score
each class by its cosine similarity, and AUROC only needs the ranking.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from distill.eval.bootstrap import Estimate
from distill.eval.classification import classification_metrics
from distill.eval.context import EvalContext
from distill.eval.embeddings import encode_texts
from distill.eval.kinds import register_kind
from teachers import Teacher


def class_embeddings(model: Teacher, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, D) unit vectors: per class, the renormalised mean of its normalised prompt embeddings."""
    prompts = [t.format(c) for c in classes for t in templates]
    emb = encode_texts(model, prompts).reshape(len(classes), len(templates), -1)
    return F.normalize(F.normalize(emb, dim=-1).mean(1), dim=-1)


def zeroshot_scores(
    image_emb: torch.Tensor, class_emb: torch.Tensor, logit_scale: float, multilabel: bool = False
) -> np.ndarray:
    """(N, C) class scores: cosine similarities (multi-label) or softmax probabilities (single-label)."""
    sim = image_emb.float() @ class_emb.float().T
    return (sim if multilabel else (logit_scale * sim).softmax(-1)).numpy()


@register_kind("zeroshot", roles=("test",), uses_templates=True)
def evaluate_zeroshot(task, model: Teacher, name: str, splits: dict, ctx: EvalContext) -> dict[str, Estimate]:
    test = splits["test"]
    img = ctx.cache.images(name, model, test, ctx.batch_size, ctx.num_workers)
    cls = class_embeddings(model, task.classes, task.templates)
    scores = zeroshot_scores(img, cls, model.logit_scale, task.multilabel)
    return classification_metrics(test.labels, scores, task.classes, task.multilabel, ctx.bootstrap, ctx.seed)
