"""The metric suite every classification task reports (zero-shot, linear probe, fine-tuning), with CIs.

Single-label: accuracy, balanced accuracy, macro-F1 and one-vs-rest macro AUROC from class scores. Multi-label:
the mean AUROC and one AUROC per class. All share one set of bootstrap resamples over test samples.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import metrics as M
from .bootstrap import Estimate, bootstrap


def classification_metrics(targets: np.ndarray, scores: np.ndarray, class_names: Sequence[str],
                           multilabel: bool = False, resamples: int = 1000, seed: int = 0) -> dict[str, Estimate]:
    """Metrics of class `scores` (N, C) against `targets` (N,) class ids or (N, C) multi-hot."""
    scores = np.asarray(scores, dtype=np.float64)
    n_classes = scores.shape[1]
    if multilabel:
        t = np.asarray(targets) > 0
        fns = {"mean_auroc": lambda i: M.mean_auroc(t[i], scores[i])}
        for c, name in enumerate(class_names):
            fns[f"auroc/{name}"] = (lambda i, c=c: M.auroc(t[i, c], scores[i, c]))
        return bootstrap(fns, len(t), resamples, seed)
    y = np.asarray(targets, dtype=np.int64)
    pred = scores.argmax(1)
    fns = {
        "accuracy": lambda i: M.accuracy(y[i], pred[i]),
        "balanced_accuracy": lambda i: M.balanced_accuracy(y[i], pred[i], n_classes),
        "macro_f1": lambda i: M.macro_f1(y[i], pred[i], n_classes),
        "macro_auroc": lambda i: M.macro_auroc(y[i], scores[i]),
    }
    return bootstrap(fns, len(y), resamples, seed)
