"""Percentile bootstrap confidence intervals over test samples, seeded and paired across metrics and models.

All metrics of one task and model are computed on the same resampled index sets, so their intervals come from
one experiment. The index sets depend only on (seed, n, strata), so every model evaluated on the same task with the
same seed sees the same resamples: replicate r of model A and replicate r of model B are computed on the same
test samples. That is what makes `paired_difference` a paired bootstrap: the interval of A - B comes from the
per-resample differences, so sampling noise shared by both models cancels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Metric = Callable[[np.ndarray], float]  # a metric of one resample, given the resampled row indices


@dataclass(frozen=True)
class Estimate:
    """A metric's point value on the full test set and its percentile bootstrap interval."""

    point: float
    ci_low: float
    ci_high: float
    n: int  # test samples (queries, for retrieval) the metric is computed on
    # the metric on each bootstrap resample, in resample order (NaN where undefined); in memory only
    replicates: np.ndarray | None = field(default=None, compare=False, repr=False)
    # classes the model predicts (argmax) over the full test set, for metrics of predictions (accuracy, F1):
    # 1 means a collapsed classifier whose accuracy-type numbers are those of a constant guess; None: not counted
    classes_predicted: int | None = None

    def to_dict(self) -> dict:
        out = {k: _json_float(getattr(self, k)) for k in ("point", "ci_low", "ci_high", "n")}
        if self.classes_predicted is not None:
            out["classes_predicted"] = self.classes_predicted
        return out

    def __str__(self) -> str:
        if not math.isfinite(self.point):
            return "n/a"
        if not (math.isfinite(self.ci_low) and math.isfinite(self.ci_high)):
            return f"{self.point:.3f}"
        return f"{self.point:.3f} [{self.ci_low:.2f}, {self.ci_high:.2f}]"


@dataclass(frozen=True)
class Difference:
    """A paired difference of two Estimates (or a mean of such differences) with its percentile interval."""

    value: float
    ci_low: float
    ci_high: float
    replicates: np.ndarray | None = field(default=None, compare=False, repr=False)  # per resample, NaN = undefined

    def to_dict(self) -> dict:
        """{"value": x, "ci": [lo, hi]}, NaN as null."""
        return {"value": _json_float(self.value), "ci": [_json_float(self.ci_low), _json_float(self.ci_high)]}

    def __str__(self) -> str:
        if not math.isfinite(self.value):
            return "n/a"
        if not (math.isfinite(self.ci_low) and math.isfinite(self.ci_high)):
            return _signed(self.value)
        return f"{_signed(self.value)} [{_signed(self.ci_low)}, {_signed(self.ci_high)}]"


def _signed(v: float) -> str:
    """'+0.031'; a value that rounds to zero prints as +0.000, never -0.000."""
    return f"{round(v, 3) + 0.0:+.3f}"


def _json_float(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The (1-level)/2 and 1-(1-level)/2 quantiles of the finite values (numpy's linear interpolation); NaN if none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def resample_indices(rng: np.random.Generator, n: int, strata: Sequence[int] | None = None) -> np.ndarray:
    """One bootstrap resample of 0..n-1; with `strata` (sizes summing to n), each block is resampled on its own."""
    if strata is None:
        return rng.integers(0, n, n)
    starts = np.cumsum([0, *strata[:-1]])
    return np.concatenate([s + rng.integers(0, m, m) for s, m in zip(starts, strata)])


def bootstrap(
    metrics: Mapping[str, Metric],
    n: int,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    strata: Sequence[int] | None = None,
) -> dict[str, Estimate]:
    """Point estimate and `level` percentile interval of each metric, with its replicates kept.

    Each metric is a function of an index array into the test samples (0..n-1, with repeats). Resamples where a
    metric is undefined (NaN, e.g. AUROC with one class drawn) are left out of that metric's interval (and kept as
    NaN in `replicates`, so replicate r always belongs to resample r). `strata` (block sizes summing to n, e.g.
    image queries then text queries) resamples each block separately. `resamples=0` gives point estimates with NaN
    bounds and no replicates.
    """
    if n <= 0:
        raise ValueError("bootstrap needs at least one test sample")
    if strata is not None and (sum(strata) != n or any(m <= 0 for m in strata)):
        raise ValueError(f"strata {list(strata)} must be positive sizes summing to n = {n}")
    full = np.arange(n)
    points = {name: float(fn(full)) for name, fn in metrics.items()}
    if resamples <= 0:
        return {k: Estimate(v, float("nan"), float("nan"), n) for k, v in points.items()}
    rng = np.random.default_rng(seed)
    draws = {name: np.empty(resamples) for name in metrics}
    for b in range(resamples):
        idx = resample_indices(rng, n, strata)
        for name, fn in metrics.items():
            draws[name][b] = fn(idx)
    out = {}
    for name, vals in draws.items():
        lo, hi = percentile_interval(vals, level)
        out[name] = Estimate(points[name], lo, hi, n, vals)
    return out


def paired_difference(a: Estimate, b: Estimate, level: float = 0.95) -> Difference:
    """a - b: the difference of the point estimates, and the percentile interval of the per-resample differences
    over the resamples where both are finite. NaN interval when either has no replicates (bootstrap 0).

    Only meaningful when both Estimates come from the same resamples (same task, seed and resample count).
    """
    value = a.point - b.point
    if a.replicates is None or b.replicates is None:
        return Difference(value, float("nan"), float("nan"))
    if len(a.replicates) != len(b.replicates):
        raise ValueError(
            f"cannot pair {len(a.replicates)} with {len(b.replicates)} bootstrap replicates; "
            "evaluate both models with the same --bootstrap and --seed"
        )
    reps = np.asarray(a.replicates, dtype=np.float64) - np.asarray(b.replicates, dtype=np.float64)
    lo, hi = percentile_interval(reps, level)
    return Difference(value, lo, hi, reps)


def mean_difference(diffs: Sequence[Difference], level: float = 0.95) -> Difference:
    """The mean of several differences (e.g. one per task), with the interval of the mean's replicates.

    Replicate r of the mean is the mean over the differences of their replicate r (tasks are independent test
    sets, each resampled on its own); resamples where any of them is undefined are left out. NaN interval when
    any difference has no replicates.
    """
    if not diffs:
        return Difference(float("nan"), float("nan"), float("nan"))
    value = float(np.mean([d.value for d in diffs]))
    reps = [d.replicates for d in diffs if d.replicates is not None]
    if len(reps) != len(diffs) or len({len(r) for r in reps}) != 1:
        return Difference(value, float("nan"), float("nan"))
    mean_reps = np.mean(np.stack(reps), axis=0)  # NaN wherever one task's replicate is NaN
    lo, hi = percentile_interval(mean_reps, level)
    return Difference(value, lo, hi, mean_reps)
