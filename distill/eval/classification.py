"""The metric suite every classification task reports (zero-shot, linear probe, fine-tuning), with CIs.

Single-label: accuracy, balanced accuracy, macro-F1 and one-vs-rest macro AUROC from class scores. Multi-label:
the mean AUROC and one AUROC per class. All share one set of bootstrap resamples over test samples. The metrics of
predictions also count the classes predicted over the test set (`Estimate.classes_predicted`): a model that gives
every image the same class is flagged in the report's verdict instead of passing as "0.500 balanced accuracy".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from distill.eval import metrics as M
from distill.eval.bootstrap import Estimate, Metric, bootstrap

PREDICTION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")  # computed from the argmax class, not scores


def classification_metrics(
    targets: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str],
    multilabel: bool = False,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Metrics of class `scores` (N, C) against `targets` (N,) class ids or (N, C) multi-hot."""
    scores = np.asarray(scores, dtype=np.float64)
    n_classes = scores.shape[1]
    if multilabel:
        t = np.asarray(targets) > 0

        def class_auroc(c: int) -> Metric:
            return lambda i: M.auroc(t[i, c], scores[i, c])

        fns: dict[str, Metric] = {"mean_auroc": lambda i: M.mean_auroc(t[i], scores[i])}
        for c, name in enumerate(class_names):
            fns[f"auroc/{name}"] = class_auroc(c)
        return bootstrap(fns, len(t), resamples, seed)
    y = np.asarray(targets, dtype=np.int64)
    pred = scores.argmax(1)
    fns = {
        "accuracy": lambda i: M.accuracy(y[i], pred[i]),
        "balanced_accuracy": lambda i: M.balanced_accuracy(y[i], pred[i], n_classes),
        "macro_f1": lambda i: M.macro_f1(y[i], pred[i], n_classes),
        "macro_auroc": lambda i: M.macro_auroc(y[i], scores[i]),
    }
    out = bootstrap(fns, len(y), resamples, seed)
    k = int(len(np.unique(pred)))  # 1: every test image gets the same class (a collapsed classifier)
    return {m: replace(e, classes_predicted=k) if m in PREDICTION_METRICS else e for m, e in out.items()}
