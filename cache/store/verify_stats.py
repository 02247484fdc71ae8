"""`distill info --verify` for the statistics a teacher's group keeps (NAME/stats/: PHI-S trains on them).

Why re-derive and not only checksum: files written before the statistics carried fletcher32 have no checksum on
them, and bytes flipped inside `image_cov` would pass every other check. The verifier already reads every stored
row; it sums the usable rows (done, not bad) in float64 on the way (`StatsCheck.add`) and compares the mean and
covariance with the stored ones, within the rounding the writer's float32 sums allow (`tolerance`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import h5py
import numpy as np

import cache.store.layout as L
from teachers.kernel.modality import MODALITIES

EPS32 = float(np.finfo(np.float32).eps)
WRITER_BLOCK_ROWS = 4096  # rows per float32 product sum when statistics are read back (`feature_stats.sums_of_rows`)


@dataclass
class _Moments:
    """float64 count, sum and sum of outer products of one modality's rows (all views)."""

    n: int = 0
    total: np.ndarray | None = None
    outer: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
        if not len(x):
            return
        if self.total is None:
            self.total, self.outer = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
        self.total += x.sum(0)
        self.outer += x.T @ x
        self.n += len(x)


@dataclass
class StatsCheck:
    """One teacher's usable rows, summed while the verifier reads them, against its stored statistics."""

    usable: np.ndarray  # (N,) bool: done and not bad (the rows the statistics cover)
    summed_rows: int  # rows of one float32 sum in the writer (the bound on its rounding)
    views: int = 1  # image rows are summed with all their views
    moments: dict[str, _Moments] = field(default_factory=lambda: {m.value: _Moments() for m in MODALITIES})
    complete: bool = True  # False once a usable row could not be read: nothing to compare with

    def add(self, modality: str, x: np.ndarray) -> None:
        """Count rows `x` (usable and readable) of one modality."""
        self.moments[modality].add(x)

    def problems(self, g: h5py.Group) -> list[tuple[str, str]]:
        """[(dataset, what is wrong)] comparing NAME/stats/ with the sums; [] when absent or all agree."""
        if L.STATS not in g or not self.complete:
            return []
        s, out = g[L.STATS], []
        for m, acc in self.moments.items():
            try:
                mean, cov = s[f"{m}_mean"][:].astype(np.float64), s[f"{m}_cov"][:].astype(np.float64)
            except OSError as e:
                out.append((f"stats/{m}_mean, stats/{m}_cov", f"unreadable ({str(e).splitlines()[0]})"))
                continue
            count = int(s.attrs.get(f"{m}_count", -1))
            if count != acc.n:
                out.append((f"stats/{m}", f"counts {count} rows, the features hold {acc.n} usable ones"))
                continue
            want_mean, want_cov, second = _mean_cov(acc, mean.shape[0])
            rows = self.summed_rows * (self.views if m == "image" else 1)
            tol_mean, tol_cov = tolerance(second, want_mean, want_cov, rows)
            for what, got, want, tol in (("mean", mean, want_mean, tol_mean), ("cov", cov, want_cov, tol_cov)):
                off = np.abs(np.nan_to_num(got - want, nan=np.inf)) > tol
                if got.shape != want.shape or off.any():
                    worst = float(np.nanmax(np.abs(got - want))) if got.shape == want.shape else float("inf")
                    out.append(
                        (
                            f"stats/{m}_{what}",
                            f"{int(off.sum())} value(s) differ from the features they "
                            f"summarise (largest difference {worst:.3g}, allowed by rounding "
                            f"{float(tol.max()):.3g})",
                        )
                    )
        return out


def _mean_cov(acc: _Moments, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, covariance (as `np.cov`: n - 1) and second moments E[x x^T] of the summed rows."""
    total, outer = acc.total, acc.outer
    if total is None:
        z = np.zeros((dim, dim))
        return np.zeros(dim), z, z
    if outer is None:  # `_Moments.add` sets both at once
        raise TypeError("_Moments.outer is None while its total is set")
    n = acc.n
    mean = total / n
    return mean, (outer - n * np.outer(mean, mean)) / max(n - 1, 1), outer / n


def tolerance(second: np.ndarray, mean: np.ndarray, cov: np.ndarray, summed_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-value bounds on what the writer's rounding can move the stored mean and covariance.

    The writer sums at most `summed_rows` products in float32 before adding them in float64: such a sum is off
    by at most gamma = summed_rows * eps32 times the sum of |x_i x_j|, which is at most sqrt(E[x_i^2] E[x_j^2])
    per row (Cauchy-Schwarz); the mean term of the covariance doubles it, the n/(n-1) of np.cov at most doubles
    that; storing in float32 adds eps32 of each value.
    """
    gamma = summed_rows * EPS32
    scale = np.sqrt(np.clip(np.diag(second), 0, None))
    tol_mean = gamma * scale + 2 * EPS32 * np.abs(mean) + 1e-12
    tol_cov = 4 * 3 * gamma * np.outer(scale, scale) + 2 * EPS32 * np.abs(cov) + 1e-12
    return tol_mean, tol_cov


def summed_rows(path: str, g: h5py.Group) -> int:
    """Rows of the longest float32 sum the writer made for this teacher: its segments' chunk rows, or
    WRITER_BLOCK_ROWS (rows read back), whichever is longer."""
    chunk = WRITER_BLOCK_ROWS
    ds = g[MODALITIES[-1].value]
    if ds.is_virtual:
        base = os.path.dirname(os.path.abspath(path))
        plist = ds.id.get_create_plist()
        for name in {plist.get_virtual_filename(i) for i in range(plist.get_virtual_count())}:
            try:
                with h5py.File(os.path.join(base, name), "r") as seg:
                    chunk = max(chunk, int(seg.attrs.get("chunk_rows", 0)))
            except OSError:  # reported by the segment checks
                pass
    return chunk
