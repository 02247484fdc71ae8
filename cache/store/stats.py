"""Per-teacher statistics (mean and covariance of the usable rows' embeddings) from running sums.

Why sums, kept by the writers: the covariance of 24M rows x 9 teachers is ~570 TFLOP of X^T X, hours on the one
process that merges; summed where the rows are embedded (on the GPU, chunk by chunk, `cache.build.run`) and saved with
each segment (`cache.store.segment_writer`), the merge only adds a few D x D matrices, and reads back just the rows that
the sums must not count (bad for another teacher, superseded by a retry) or that a killed run never summed.
A chunk's X^T X runs in float32 (float16 storage values: products exact, sums of at most a chunk of them), the
running totals in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

import cache.store.layout as L
from teachers.kernel.modality import MODALITIES


@dataclass
class Sums:
    """count, sum (D,) and outer-product sum (D, D) of one teacher's embeddings of one modality (all views)."""

    count: int = 0
    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None

    def add(self, x: torch.Tensor, sign: int = 1) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if len(x) == 0:
            return
        if self.total is None:
            d = x.shape[-1]
            self.total = torch.zeros(d, dtype=torch.float64, device=x.device)
            self.outer = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        total, outer = self.moments()
        total += sign * x.sum(0).double()  # in place: self.total, self.outer
        outer += sign * (x.T @ x).double()
        self.count += sign * len(x)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(total, outer), which `add` and `merge` set together; TypeError before any row."""
        if self.total is None or self.outer is None:
            raise TypeError("Sums.moments: no rows summed yet (total/outer are None)")
        return self.total, self.outer

    def merge(self, other: Sums) -> None:
        if other.total is None:
            return
        other_total, other_outer = other.moments()
        if self.total is None:
            self.total, self.outer = other_total.clone().cpu(), other_outer.clone().cpu()
        else:
            total, outer = self.moments()
            total += other_total.cpu()  # in place: self.total, self.outer
            outer += other_outer.cpu()
        self.count += other.count

    def mean_cov(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 mean (D,) and covariance (D, D), as `np.cov` of the rows (zeros for none)."""
        if self.total is None:
            return np.zeros(dim, np.float32), np.zeros((dim, dim), np.float32)
        n = self.count
        total_t, outer_t = self.moments()
        total, outer = total_t.cpu().numpy(), outer_t.cpu().numpy()
        mean = total / max(n, 1)
        cov = (outer - n * np.outer(mean, mean)) / max(n - 1, 1)
        return mean.astype(np.float32), cov.astype(np.float32)


@dataclass
class TeacherSums:
    """Sums per modality of one teacher, and how many rows they cover."""

    rows: int = 0
    by: dict[str, Sums] = field(default_factory=lambda: {m.value: Sums() for m in MODALITIES})

    def add(self, image: torch.Tensor, text: torch.Tensor, sign: int = 1) -> None:
        self.by["image"].add(image, sign)
        self.by["text"].add(text, sign)
        self.rows += sign * len(text)

    def merge(self, other: TeacherSums) -> None:
        for m, s in other.by.items():
            self.by[m].merge(s)
        self.rows += other.rows

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for a file (`image_total`, `image_outer`, `image_count`, ..., `rows`)."""
        out = {"rows": np.array(self.rows, np.int64)}
        for m, s in self.by.items():
            if s.total is not None:
                total, outer = s.moments()
                out[f"{m}_total"], out[f"{m}_outer"] = total.cpu().numpy(), outer.cpu().numpy()
            out[f"{m}_count"] = np.array(s.count, np.int64)
        return out

    @classmethod
    def from_arrays(cls, a: dict) -> TeacherSums:
        t = cls(rows=int(a["rows"]))
        for m in t.by:
            if f"{m}_total" in a:
                t.by[m] = Sums(
                    int(a[f"{m}_count"]),
                    torch.from_numpy(np.asarray(a[f"{m}_total"], np.float64)),
                    torch.from_numpy(np.asarray(a[f"{m}_outer"], np.float64)),
                )
        return t


def write_stats(g, sums: TeacherSums, dims: dict[str, int]) -> None:
    """NAME/stats/ from the sums (replacing an older one): {image,text}_{mean,cov}, counts in its attrs."""
    if L.STATS in g:
        del g[L.STATS]
    s = g.create_group(L.STATS)
    for m in MODALITIES:
        mean, cov = sums.by[m.value].mean_cov(dims[m.value])
        s.create_dataset(f"{m.value}_mean", data=mean, fletcher32=True)  # PHI-S trains on them: checksummed
        s.create_dataset(f"{m.value}_cov", data=cov, fletcher32=True)
        s.attrs[f"{m.value}_count"] = sums.by[m.value].count
    s.attrs["count"] = int(sums.rows)


def sums_of_rows(ds_image, ds_text, slots: np.ndarray, block: int = 4096, sign: int = 1) -> TeacherSums:
    """Sums over `slots` (sorted positions) of two datasets, read as spans of at most `block` rows (sign -1: the
    negated sums, to take rows out of a total)."""
    out = TeacherSums()
    slots = np.asarray(slots, dtype=np.int64)
    i = 0
    while i < len(slots):
        lo = int(slots[i])
        j = int(np.searchsorted(slots, lo + block))
        s, hi = slots[i:j], int(slots[j - 1]) + 1
        img, txt = ds_image[lo:hi][s - lo], ds_text[lo:hi][s - lo]
        out.add(torch.from_numpy(np.asarray(img, np.float32)), torch.from_numpy(np.asarray(txt, np.float32)), sign)
        i = j
    return out
