"""Chance levels: the expected value of each metric for a scorer that knows nothing about the images.

Classification (zero-shot, linear probe, fine-tuning): AUROC of random scores is 0.5; a uniform random guess among
C classes has expected accuracy and balanced accuracy 1/C, and expected per-class F1 close to
2 p_c (1/C) / (p_c + 1/C) where p_c is class c's share of the test labels (precision p_c, recall 1/C; the ratio of
expectations, exact as the test set grows), averaged over all C classes (a class absent from the test labels
scores 0, as scikit-learn's label set counts it once it is predicted).

Accuracy has a second floor, the majority-class level (`majority_share`): the accuracy of always answering the
commonest test class, shown beside 1/C because an unbalanced test set lets a constant answer beat 1/C.

Retrieval: a uniformly random ranking of the gallery, which is what `metrics.hit_probabilities` gives a constant
model. An image query has one right caption among the U distinct captions: R@k = min(1, k / U). A caption carried by
P of the N images is found in the top k with probability 1 - C(N - P, k) / C(N, k); R@k is its mean over captions
(= min(1, k / N) when every caption has one image). These are exact expectations, not approximations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from distill.eval.retrieval import KS, dedupe_captions, image_groups, positives


def uniform_guess_macro_f1(labels: np.ndarray, n_classes: int) -> float:
    """Expected macro-F1 of guessing each of `n_classes` uniformly at random, given single-label test `labels`."""
    p = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)[:n_classes] / max(len(labels), 1)
    q = 1.0 / n_classes
    return float(np.mean(np.where(p > 0, 2 * p * q / np.maximum(p + q, 1e-300), 0.0)))


def retrieval_chance(owner: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """R@k of a random ranking both ways, and their mean; `owner[i]` is image i's caption index (dedupe_captions),
    or an (N_img, N_txt) bool mask of the captions each image has (`retrieval.positives`)."""
    owner = np.asarray(owner)
    pos = owner if owner.ndim == 2 else positives(owner)
    n_img, n_txt = pos.shape
    per_image, per_caption = pos.sum(1), pos.sum(0)  # captions an image has, images a caption has
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = _any_in_top(per_image, n_txt, k)
        out[f"text_to_image_R@{k}"] = _any_in_top(per_caption, n_img, k)
    out["mean_recall"] = float(np.mean(list(out.values())))
    return out


def _any_in_top(p: np.ndarray, n: int, k: int) -> float:
    """Mean over queries of P(one of a query's p positives among n items is in a random top k): 1 - C(n-p,k)/C(n,k)."""
    i = np.arange(min(k, n), dtype=np.float64)[None, :]
    miss = np.prod(np.clip(n - p[:, None] - i, 0, None) / (n - i), axis=1)
    return float(np.mean(1.0 - miss))


def classification_chance(metric: str, labels: np.ndarray | None, n_classes: int) -> float | None:
    """Chance level of one classification metric key (`accuracy`, `2-shot/macro_f1`, `auroc/CLASS`, ...)."""
    parts = metric.split("/")
    if any(p in ("auroc", "macro_auroc", "mean_auroc") for p in parts):
        return 0.5
    base = parts[-1]
    if base in ("accuracy", "balanced_accuracy"):
        return 1.0 / n_classes
    if base == "macro_f1" and labels is not None and np.asarray(labels).ndim == 1:
        return uniform_guess_macro_f1(labels, n_classes)
    return None


def majority_share(labels: np.ndarray | None, n_classes: int) -> float | None:
    """Accuracy of always answering the test set's commonest class (single-label); None for multi-label.

    Why beside 1/C: on an unbalanced test set a model that learnt nothing but the commonest class beats 1/C in
    accuracy; this is the level its accuracy must clear to show it tells classes apart."""
    if labels is None or np.asarray(labels).ndim != 1 or not len(labels):
        return None
    return float(np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).max() / len(labels))


def majority_levels(task, test, metrics: Iterable[str]) -> dict[str, float]:
    """{accuracy metric key: `majority_share`} for a single-label classification task's `accuracy` keys."""
    if task.kind == "retrieval":
        return {}
    share = majority_share(test.labels, len(task.classes))
    return {} if share is None else {m: share for m in metrics if m.split("/")[-1] == "accuracy"}


def chance_levels(task, test, metrics: Iterable[str]) -> dict[str, float | None]:
    """{metric: chance level or None (unknown)} for a task (`TaskCfg`) and its test split (`SplitData`)."""
    metrics = list(metrics)
    if task.kind == "retrieval":
        table = retrieval_chance(positives(dedupe_captions(test.captions)[1], image_groups(test.images)[0]))
        return {m: table.get(m) for m in metrics}
    return {m: classification_chance(m, test.labels, len(task.classes)) for m in metrics}
