"""Classification and retrieval metrics as pure numpy functions (no scikit-learn dependency).

Why hand-written: they run thousands of times inside the bootstrap, on index-resampled arrays, so they must be
small and fast; each one matches scikit-learn's definition (tests check them against hand-computed cases).
Conventions: `y` are integer class ids (N,), `scores` are (N, C) class scores (probabilities or similarities),
multi-label targets are (N, C) 0/1 arrays. A metric that is undefined on its input (AUROC with one class present)
returns NaN; the bootstrap skips such resamples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged (scipy.stats.rankdata's 'average')."""
    x = np.asarray(x)
    n = x.shape[0]
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_group = np.empty(n, dtype=bool)
    new_group[:1] = True
    new_group[1:] = xs[1:] != xs[:-1]
    group = np.cumsum(new_group) - 1
    counts = np.bincount(group)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    avg = starts + (counts + 1) / 2.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = avg[group]
    return ranks


def auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction); NaN unless both classes occur."""
    positive = np.asarray(positive).astype(bool)
    n_pos = int(positive.sum())
    n_neg = positive.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(np.asarray(y) == np.asarray(pred))) if len(y) else float("nan")


def confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = true class, columns = predicted class."""
    return np.bincount(np.asarray(y) * n_classes + np.asarray(pred), minlength=n_classes**2).reshape(
        n_classes, n_classes
    )


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes present in `y` (scikit-learn's balanced_accuracy_score)."""
    cm = confusion(y, pred, n_classes)
    support = cm.sum(1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(np.diag(cm)[present] / support[present]))


def macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean F1 over the classes present in `y` or `pred` (scikit-learn's default label set)."""
    cm = confusion(y, pred, n_classes)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    used = (support + predicted) > 0
    if not used.any():
        return float("nan")
    f1 = np.where(used, 2 * tp / np.maximum(support + predicted, 1), 0.0)
    return float(np.mean(f1[used]))


def per_class_auroc(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each column (one-vs-rest); NaN for a class without both positives and negatives."""
    return np.array([auroc(targets[:, c], scores[:, c]) for c in range(scores.shape[1])])


def macro_auroc(y: np.ndarray, scores: np.ndarray) -> float:
    """One-vs-rest AUROC averaged over the classes that have positives and negatives in `y`."""
    n_classes = scores.shape[1]
    onehot = np.eye(n_classes, dtype=bool)[np.asarray(y)]
    vals = per_class_auroc(onehot, scores)
    return float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")


def mean_auroc(targets: np.ndarray, scores: np.ndarray) -> float:
    """Multi-label: mean of the per-class AUROCs that are defined (NIH ChestX-ray14 style)."""
    vals = per_class_auroc(targets, scores)
    return float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")


def hit_probabilities(sim: np.ndarray, positives: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """(Q, len(ks)): for each query row of `sim` (Q, G), the probability that a positive is in its top k.

    `positives` is a (Q, G) boolean mask. Without ties this is 0 or 1. Ties with the best positive are
    broken uniformly at random, as an expectation (AUROC counts a tie as one half for the same reason), so a
    constant similarity scores exactly chance, P / (P + N) at k = 1, and never looks better or worse than that.
    """
    sim = np.asarray(sim, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    best = np.where(positives, sim, -np.inf).max(1)[:, None]
    above = ((sim > best) & ~positives).sum(1)  # negatives strictly ahead of every positive
    tie_neg = ((sim == best) & ~positives).sum(1).astype(np.float64)
    tie_pos = ((sim == best) & positives).sum(1).astype(np.float64)
    kmax = max(ks)
    # miss[:, j] = P(the first j items of the tie group are all negatives), for j = 0..kmax
    i = np.arange(kmax, dtype=np.float64)[None, :]
    ratio = np.clip(tie_neg[:, None] - i, 0, None) / np.maximum(tie_neg[:, None] + tie_pos[:, None] - i, 1)
    miss = np.concatenate([np.ones((len(sim), 1)), np.cumprod(ratio, axis=1)], axis=1)
    out = np.empty((len(sim), len(ks)))
    for c, k in enumerate(ks):
        j = np.clip(k - above, 0, kmax)
        out[:, c] = np.where(above >= k, 0.0, 1.0 - miss[np.arange(len(sim)), j])
    return out


def recall_at_k(hits: np.ndarray) -> float:
    """Mean of per-query hit indicators (or hit probabilities, see `hit_probabilities`)."""
    return float(np.mean(hits)) if len(hits) else float("nan")
