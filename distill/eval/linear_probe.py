"""Linear probe: logistic regression on frozen image features, full and few-shot (k images per class).

Multinomial (softmax) for single-label tasks, one sigmoid per class for multi-label; fitted full-batch with
L-BFGS in float64 (the problems are small and convex, so the optimum is reached, as scikit-learn's would be).
The L2 strength is chosen from a small grid on the validation split (accuracy, or mean AUROC for multi-label;
ties broken by the validation log-loss), then the test split is scored once. Features are standardised with statistics
of the whole train split's images (labels unused), so one grid fits every model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from distill.eval import metrics as M
from distill.eval.bootstrap import Estimate
from distill.eval.classification import classification_metrics
from distill.eval.context import EvalContext
from distill.eval.kinds import register_kind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearModel:
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)

    def scores(self, x: torch.Tensor, multilabel: bool = False) -> np.ndarray:
        logits = x.double() @ self.weight.T + self.bias
        return (logits.sigmoid() if multilabel else logits.softmax(-1)).numpy()


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, multilabel: bool = False, max_iter: int = 200
) -> LinearModel:
    """Minimise mean cross-entropy (or BCE) + l2/2 * ||W||^2 with L-BFGS."""
    x = x.double()
    w = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    target = y.double() if multilabel else y.long()
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        logits = x @ w.T + b
        loss = (
            F.binary_cross_entropy_with_logits(logits, target) if multilabel else F.cross_entropy(logits, target)
        ) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearModel(w.detach(), b.detach())


def few_shot_indices(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Up to k seeded training rows per class (positives per class for multi-hot labels), sorted."""
    rng = np.random.default_rng(seed)
    hot = labels > 0 if labels.ndim == 2 else labels[:, None] == np.arange(labels.max() + 1)[None, :]
    chosen: set[int] = set()
    for c in range(hot.shape[1]):
        rows = np.flatnonzero(hot[:, c])
        if len(rows):
            chosen.update(rng.choice(rows, min(k, len(rows)), replace=False).tolist())
    return np.array(sorted(chosen), dtype=np.int64)


def _val_score(model: LinearModel, x, y, multilabel: bool) -> tuple[float, float]:
    """(accuracy or mean AUROC, minus the log-loss): the loss breaks ties, common with few val images."""
    s = np.clip(model.scores(x, multilabel), 1e-12, 1.0)
    if multilabel:
        t = y > 0
        v = M.mean_auroc(t, s)
        loss = -np.mean(np.where(t, np.log(s), np.log(np.clip(1 - s, 1e-12, 1.0))))
    else:
        v = M.accuracy(y, s.argmax(1))
        loss = -np.mean(np.log(s[np.arange(len(y)), y]))
    return (v if math.isfinite(v) else -math.inf, -float(loss))


def select_and_fit(
    xtr, ytr, xval, yval, n_classes: int, grid, multilabel: bool = False, max_iter: int = 200
) -> tuple[LinearModel, float]:
    """Fit each L2 strength on train, keep the best on val; returns (model, l2)."""
    best: LinearModel | None = None
    best_l2, best_score = 0.0, (-math.inf, -math.inf)
    for l2 in sorted(grid, reverse=True):
        model = fit_logistic(xtr, torch.as_tensor(ytr), n_classes, l2, multilabel, max_iter)
        score = _val_score(model, xval, yval, multilabel)
        if best is None or score > best_score:
            best, best_l2, best_score = model, l2, score
    if best is None:
        raise ValueError("select_and_fit needs at least one L2 strength in its grid")
    return best, best_l2


def probe_settings(cfg) -> list[tuple[str, int | None]]:
    return [(f"{k}-shot", k) for k in cfg.shots] + ([("full", None)] if cfg.full else [])


@register_kind("linear_probe")
def evaluate_linear_probe(task, model, name: str, splits: dict, ctx: EvalContext) -> dict[str, Estimate]:
    cfg = task.linear_probe
    feats = {
        r: ctx.cache.images(name, model, splits[r], ctx.batch_size, ctx.num_workers).double()
        for r in ("train", "val", "test")
    }
    mean, std = feats["train"].mean(0), feats["train"].std(0, unbiased=False).clamp_min(1e-6)
    x = {r: (f - mean) / std for r, f in feats.items()}
    y = {r: splits[r].labels for r in ("train", "val", "test")}
    n_classes = len(task.classes)
    out: dict[str, Estimate] = {}
    for setting, k in probe_settings(cfg):
        idx = np.arange(len(y["train"])) if k is None else few_shot_indices(y["train"], k, ctx.seed)
        fitted, l2 = select_and_fit(
            x["train"][idx], y["train"][idx], x["val"], y["val"], n_classes, cfg.l2_grid, task.multilabel, cfg.max_iter
        )
        log.info("%s %s %s: %d training images, L2 %.0e chosen on val", task.name, name, setting, len(idx), l2)
        scores = fitted.scores(x["test"], task.multilabel)
        res = classification_metrics(y["test"], scores, task.classes, task.multilabel, ctx.bootstrap, ctx.seed)
        out.update({f"{setting}/{m}": v for m, v in res.items()})
    return out
