"""The verdict maths of `multi_teacher.py`: intervals over training seeds and test rows together, the mean over
domains, and the chance flag. Pure numpy on `distill eval`'s bootstrap replicates; nothing here trains or reads files.

Seeds and rows, a two-level bootstrap. A model trained with S seeds has, on one task, S point estimates p[s] and
S x R bootstrap replicates x[s, r]. `distill eval` draws its row resamples from the eval seed and the test set only,
so replicate r is the same resample of the test rows for every model and every training seed: the design is crossed
(every seed's models are scored on the same rows). A difference A - B (student minus baseline of the same seed s;
a teacher is one model, the same for every s) has d[s] = pA[s] - pB[s] and d[s, r] = xA[s, r] - xB[s, r].
- value: mean over seeds of d[s];
- replicate r: draw S seeds with replacement, j[r, 1..S] (`seed_draws`: one draw per replicate, shared by every task
  and every model, so a seed's student and baseline stay together and a mean over tasks resamples whole runs), and
  take mean_k d[j[r, k], r]: the seeds resampled, and the rows resampled once for all of them (row resample r);
- 95% interval: the 2.5 and 97.5 percentiles of the R replicates (numpy's linear interpolation); replicates that
  are undefined (NaN: e.g. one class drawn, AUROC undefined) are left out.
With one seed every draw is that seed, and this is exactly `distill eval`'s paired row bootstrap. With few seeds
the seed level is coarse (3 seeds: 10 distinct multisets), so the interval is a floor on the seed-to-seed spread,
not a precise estimate of it; it still widens when seeds disagree, which a row-only interval never does.

The mean over domains (`domain_weights`): each domain weighs 1/D; within a domain its test sets share the weight
equally, and tasks on the same test set (e.g. two tasks reading the same 197 MedPix images) share their test set's
weight, so correlated tasks count once. Being linear, the weighted mean is applied to d[s] and d[s, r] before the
seed draw (`weighted_sum`), which is the same as averaging each replicate's per-task values.

The chance flag (`at_chance`): a task is at chance when EVERY model compared on it (every seed's student, baseline
and reference, and every teacher) has a 95% row interval that contains the task's chance level (the expected score
of a random scorer, `distill.eval.chance`). Such a task cannot rank anything: the report flags it and the mean over
domains leaves it out (a domain all of whose tasks are flagged drops out of the mean).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from distill.eval.bootstrap import Difference, Estimate, percentile_interval

DRAW_STREAM = 7  # the seed draws' own random stream beside the eval's row resamples (same seed, other stream)


@dataclass(frozen=True)
class SeedValues:
    """One quantity (a model's metric, or a difference of two) over S training seeds.

    points: (S,) the value on the full test set per seed; replicates: (S, R) its value on each row resample per
    seed (row resample r the same for every seed), None when the eval ran without a bootstrap."""

    points: np.ndarray
    replicates: np.ndarray | None

    def __post_init__(self):
        object.__setattr__(self, "points", np.asarray(self.points, dtype=np.float64).reshape(-1))
        if self.replicates is not None:
            reps = np.asarray(self.replicates, dtype=np.float64)
            if reps.ndim != 2 or reps.shape[0] != len(self.points):
                raise ValueError(f"replicates must be (seeds, resamples) = ({len(self.points)}, R), got {reps.shape}")
            object.__setattr__(self, "replicates", reps)

    @classmethod
    def of(cls, estimates: Sequence[Estimate]) -> SeedValues:
        """From one Estimate per seed (in seed order); replicates only when every seed has them, equally many."""
        reps = [e.replicates for e in estimates if e.replicates is not None]
        same = len(reps) == len(estimates) and len({len(r) for r in reps}) == 1
        return cls(np.array([e.point for e in estimates], dtype=np.float64), np.stack(reps) if same else None)

    @property
    def n_seeds(self) -> int:
        return len(self.points)

    def __sub__(self, other: SeedValues) -> SeedValues:
        if other.n_seeds != self.n_seeds:
            raise ValueError(f"cannot pair {self.n_seeds} seeds with {other.n_seeds}")
        a, b = self.replicates, other.replicates
        paired = a is not None and b is not None and a.shape == b.shape
        return SeedValues(self.points - other.points, a - b if a is not None and b is not None and paired else None)

    def seed(self, i: int) -> SeedValues:
        """Seed i alone (its row-only interval comes from `interval` on it)."""
        return SeedValues(self.points[i : i + 1], None if self.replicates is None else self.replicates[i : i + 1])


def seed_draws(n_seeds: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, n_seeds) seed indices drawn with replacement, row r for bootstrap replicate r; one seed: zeros."""
    if n_seeds < 1 or resamples < 0:
        raise ValueError(f"need n_seeds >= 1 and resamples >= 0, got {n_seeds} and {resamples}")
    return np.random.default_rng([seed, DRAW_STREAM]).integers(0, n_seeds, (resamples, n_seeds))


def interval(v: SeedValues, draws: np.ndarray | None, level: float = 0.95) -> Difference:
    """Mean over seeds and its seed x row percentile interval (module docstring); NaN interval without replicates.

    `draws` (R, S) from `seed_draws` (None: drawn here from seed 0); a one-seed `v` ignores them (its only seed)."""
    value = float(np.mean(v.points)) if len(v.points) else float("nan")
    if v.replicates is None or v.replicates.shape[1] == 0:
        return Difference(value, float("nan"), float("nan"))
    s, r = v.replicates.shape
    if s == 1:
        reps = v.replicates[0].copy()
    else:
        draws = seed_draws(s, r) if draws is None else np.asarray(draws)
        if draws.shape != (r, s) or draws.min() < 0 or draws.max() >= s:
            raise ValueError(f"seed draws must be ({r}, {s}) indices below {s}, got shape {draws.shape}")
        reps = v.replicates[draws, np.arange(r)[:, None]].mean(axis=1)  # replicate r: mean_k d[draws[r, k], r]
    lo, hi = percentile_interval(reps, level)
    return Difference(value, lo, hi, reps)


def domain_weights(tasks: Sequence[str], domain: Mapping[str, str], test_set: Mapping[str, str]) -> dict[str, float]:
    """{task: weight} for the mean over domains: 1/D per domain, split equally over its test sets, then over the
    tasks sharing a test set. A task missing from `domain` is a domain of its own; from `test_set`, a test set."""
    by_domain: dict[str, dict[str, list[str]]] = {}
    for t in tasks:
        by_domain.setdefault(domain.get(t, t), {}).setdefault(test_set.get(t, t), []).append(t)
    out = {}
    for sets in by_domain.values():
        for members in sets.values():
            for t in members:
                out[t] = 1.0 / len(by_domain) / len(sets) / len(members)
    return out


def weighted_sum(parts: Mapping[str, SeedValues], weights: Mapping[str, float]) -> SeedValues:
    """sum_t w_t * parts[t], on points and on replicates (None if any part lacks them); the tasks of `weights`."""
    if not weights:
        raise ValueError("nothing to average: no task has a weight")
    chosen = [(parts[t], w) for t, w in weights.items()]
    # weights is not empty, so neither sum is its start value 0
    points = cast(np.ndarray, sum(w * p.points for p, w in chosen))
    with_reps = [(p.replicates, w) for p, w in chosen if p.replicates is not None]
    reps = None
    if len(with_reps) == len(chosen) and len({r.shape for r, _ in with_reps}) == 1:
        reps = cast(np.ndarray, sum(w * r for r, w in with_reps))
    return SeedValues(points, reps)


def at_chance(intervals: Iterable[tuple[float | None, float | None]], chance: float | None) -> bool:
    """True when chance is known and every (low, high) interval contains it. Without a chance level, without
    models, or when a model has no interval (bootstrap 0, undefined), nothing is known: False (not flagged)."""
    if chance is None or not math.isfinite(chance):
        return False
    seen = False
    for lo, hi in intervals:
        seen = True
        if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)) or not lo <= chance <= hi:
            return False
    return seen
