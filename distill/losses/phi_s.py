"""PHI-S: isotropic standardisation of teacher features (Ranzinger et al., 2024, arXiv:2410.01680).

Teachers' embeddings have very different spreads, so a feature-matching loss summed over teachers is dominated
by the widest one. PHI-S maps each teacher's features x (dimension C, mean mu, covariance U diag(lam) U^T) to

    x' = alpha * R @ U^T @ (x - mu),      alpha = 1 / sqrt(mean(lam)),

where R is a normalised Hadamard matrix (H / sqrt(C), entries +-1/sqrt(C)). Why this works: U^T decorrelates,
leaving diagonal variances lam; any rotation R with |R_ij| = 1/sqrt(C) turns them into sum_j lam_j / C = mean(lam)
on EVERY dimension; the single scalar alpha then gives every dimension of every teacher variance 1. Unlike
whitening it never divides by tiny eigenvalues (robust to low-rank teachers), and it is invertible.

Hadamard matrices are built as Sylvester (2^k) x Paley I (q + 1, prime q = 3 mod 4) x Paley II (2(q + 1), prime
q = 1 mod 4); that covers the usual embedding sizes (256, 384 = 12*32, 512, 640 = 20*32, 768 = 12*64, 1024, ...).
For a size with none of these (odd sizes, 6, 10, ...), we fall back to an exact substitute that the paper's
argument also allows: C - 1 Givens rotations chosen from lam so that the diagonal of R diag(lam) R^T is exactly
mean(lam) (the constructive Schur-Horn step, Chan & Li 1983). The per-dimension variance is then still exactly
1; only the "spread every eigen-direction evenly" property of Hadamard is lost.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from teachers.kernel.modality import MODALITIES, Modality


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, int(math.isqrt(n)) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = chi(a - b) with chi the quadratic character mod prime q."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in squares else -1 for i in range(1, q)], dtype=np.int64)
    idx = (np.arange(q)[:, None] - np.arange(q)[None, :]) % q
    return chi[idx]


def _paley1(q: int) -> np.ndarray:
    """Order q + 1 for prime q = 3 mod 4: H = I + [[0, 1^T], [-1, Q]]."""
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + np.eye(n, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    """Order 2(q + 1) for prime q = 1 mod 4: expand [[0, 1^T], [1, Q]] entry-wise into 2x2 blocks."""
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = 1
    s[1:, 1:] = _jacobsthal(q)
    zero = np.array([[1, -1], [-1, -1]])
    one = np.array([[1, 1], [1, -1]])
    return np.block([[zero if v == 0 else v * one for v in row] for row in s])


def _small_hadamard(m: int) -> np.ndarray | None:
    if m == 1:
        return np.ones((1, 1), dtype=np.int64)
    if m == 2:
        return np.array([[1, 1], [1, -1]], dtype=np.int64)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


def hadamard(n: int) -> np.ndarray | None:
    """A +-1 matrix H with H @ H.T == n * I, or None when our constructions do not reach n."""
    if n < 1:
        raise ValueError(f"hadamard order must be >= 1, got {n}")
    k, m = 0, n
    while True:  # try n = 2^k * m with the largest Sylvester factor first
        base = _small_hadamard(m)
        if base is not None:
            h = base
            for _ in range(k):
                h = np.block([[h, h], [h, -h]])
            return h
        if m % 2:
            return None
        k, m = k + 1, m // 2


def equalising_rotation(lam: np.ndarray) -> np.ndarray:
    """Orthogonal R with diag(R diag(lam) R^T) == mean(lam) exactly (any size), by C - 1 Givens rotations."""
    lam = np.asarray(lam, dtype=np.float64)
    c = lam.shape[0]
    t = lam.mean()
    a = np.diag(lam)
    r = np.eye(c)
    tol = 1e-12 * max(abs(t), 1e-300)
    for _ in range(c):
        d = np.diag(a)
        hi, lo = np.flatnonzero(d > t + tol), np.flatnonzero(d < t - tol)
        if len(hi) == 0 or len(lo) == 0:
            break
        i, j = hi[0], lo[0]
        aii, ajj, aij = a[i, i], a[j, j], a[i, j]
        # rotate rows/cols (i, j) by angle th so the new a_ii == t: (ajj - t) x^2 + 2 aij x + (aii - t) = 0
        qa, qb, qc = ajj - t, 2 * aij, aii - t
        x = (-qb - math.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa)
        cs, sn = 1 / math.sqrt(1 + x * x), x / math.sqrt(1 + x * x)
        g = np.eye(c)
        g[i, i], g[i, j], g[j, i], g[j, j] = cs, sn, -sn, cs
        a = g @ a @ g.T
        r = g @ r
    return r


def isotropic_rotation(lam: np.ndarray) -> np.ndarray:
    """The normalised Hadamard matrix when one exists for this size, else the exact Givens substitute."""
    h = hadamard(len(lam))
    return h / math.sqrt(len(lam)) if h is not None else equalising_rotation(lam)


def phi_s_affine(mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) with x' = W x + b the PHI-S map for features of this mean and covariance (float64 maths)."""
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    cov = np.asarray(cov, dtype=np.float64)
    c = mean.shape[0]
    if cov.shape != (c, c):
        raise ValueError(f"covariance has shape {cov.shape}, expected {(c, c)} to match a mean of size {c}")
    lam, u = np.linalg.eigh((cov + cov.T) / 2)
    lam = np.clip(lam, 0.0, None)
    if lam.mean() <= 0:
        raise ValueError("covariance is zero: the features do not vary, PHI-S cannot scale them")
    w = isotropic_rotation(lam) @ u.T / math.sqrt(lam.mean())
    return w, -w @ mean


class PhiS(nn.Module):
    """Applies each teacher's PHI-S map; built once from the cache statistics.

    stats: {teacher: {"image_mean": (D,), "image_cov": (D, D), "text_mean": (D,), "text_cov": (D, D)}}.
    """

    def __init__(
        self,
        stats: dict[str, dict[str, np.ndarray]],
        teachers: list[str],
        modalities: tuple[Modality, ...] = MODALITIES,
    ):
        super().__init__()
        self.keys: dict[tuple[str, Modality], str] = {}
        for t in teachers:
            if t not in stats:
                raise KeyError(
                    f"balance='phi_s' needs cache statistics for teacher {t!r}; have {sorted(stats) or 'none'} "
                    f"(compute them with the cache's stats step)"
                )
            for m in modalities:
                missing = [k for k in (f"{m}_mean", f"{m}_cov") if k not in stats[t]]
                if missing:
                    raise KeyError(f"statistics of teacher {t!r} lack {missing}; have {sorted(stats[t])}")
                try:
                    w, b = phi_s_affine(stats[t][f"{m}_mean"], stats[t][f"{m}_cov"])
                except ValueError as e:
                    raise ValueError(f"PHI-S for teacher {t!r}, {m}: {e}") from None
                key = f"{len(self.keys)}"
                self.keys[(t, Modality(m))] = key
                self.register_buffer(f"w{key}", torch.from_numpy(w).float(), persistent=False)
                self.register_buffer(f"b{key}", torch.from_numpy(b).float(), persistent=False)

    def forward(self, x: Tensor, teacher: str, modality: Modality) -> Tensor:
        key = self.keys[(teacher, Modality(modality))]
        w, b = getattr(self, f"w{key}"), getattr(self, f"b{key}")
        if x.shape[-1] != w.shape[0]:
            raise ValueError(
                f"teacher {teacher!r} {modality} features have dim {x.shape[-1]} but its PHI-S statistics "
                f"have dim {w.shape[0]}: were the statistics computed on another cache?"
            )
        return x.float() @ w.T + b
