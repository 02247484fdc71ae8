"""Percentile bootstrap confidence intervals over test samples, seeded and paired across metrics.

All metrics of one task and model are computed on the same resampled index sets, so their intervals come from
one experiment; the same seed across models makes resamples identical (paired) for every model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A metric's point value on the full test set and its percentile bootstrap interval."""

    point: float
    ci_low: float
    ci_high: float
    n: int  # test samples (queries, for retrieval) the metric is computed on

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        if not math.isfinite(self.point):
            return "n/a"
        if not (math.isfinite(self.ci_low) and math.isfinite(self.ci_high)):
            return f"{self.point:.3f}"
        return f"{self.point:.3f} [{self.ci_low:.2f}, {self.ci_high:.2f}]"


def bootstrap(metrics: Mapping[str, Callable[[np.ndarray], float]], n: int, resamples: int = 1000,
              seed: int = 0, level: float = 0.95) -> dict[str, Estimate]:
    """Point estimate and `level` percentile interval of each metric.

    Each metric is a function of an index array into the test samples (0..n-1, with repeats). Resamples where a
    metric is undefined (NaN, e.g. AUROC with one class drawn) are left out of that metric's interval.
    `resamples=0` gives point estimates with NaN bounds.
    """
    if n <= 0:
        raise ValueError("bootstrap needs at least one test sample")
    full = np.arange(n)
    points = {name: float(fn(full)) for name, fn in metrics.items()}
    if resamples <= 0:
        return {k: Estimate(v, float("nan"), float("nan"), n) for k, v in points.items()}
    rng = np.random.default_rng(seed)
    draws = {name: np.empty(resamples) for name in metrics}
    for b in range(resamples):
        idx = rng.integers(0, n, n)
        for name, fn in metrics.items():
            draws[name][b] = fn(idx)
    alpha = (1.0 - level) / 2.0
    out = {}
    for name, vals in draws.items():
        vals = vals[np.isfinite(vals)]
        lo, hi = (np.quantile(vals, [alpha, 1.0 - alpha]) if len(vals) else (float("nan"), float("nan")))
        out[name] = Estimate(points[name], float(lo), float(hi), n)
    return out
