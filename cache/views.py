"""Augmented views drawn once per sample and stored, so every teacher (and the student) sees the same crops.

A view is 5 numbers: the relative crop box (x0, y0, w, h) and a flip flag, applied by
`teachers.transforms.apply_view` before each model's own resize and normalisation.
"""
from __future__ import annotations

import math

import numpy as np

SCALE = (0.5, 1.0)
RATIO = (3 / 4, 4 / 3)
FLIP_P = 0.5


def draw_view_params(n: int, k: int, seed: int = 0, scale=SCALE, ratio=RATIO, flip_p: float = FLIP_P,
                     attempts: int = 10) -> np.ndarray:
    """(n, k, 5) float32: RandomResizedCrop-style boxes in relative coordinates, plus a flip flag.

    Like torchvision's RandomResizedCrop: area fraction ~ U(scale), log aspect ~ U(log ratio), up to
    `attempts` tries for a box that fits, else the whole image. Deterministic in (n, k, seed) alone, so every
    process of a multi-process run draws the same array.
    """
    rng = np.random.default_rng(seed)
    shape = (n, k, attempts)
    area = rng.uniform(scale[0], scale[1], size=shape)
    log_r = rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=shape)
    r = np.exp(log_r)
    w, h = np.sqrt(area * r), np.sqrt(area / r)
    ok = (w <= 1.0) & (h <= 1.0)
    first = np.argmax(ok, axis=-1)
    any_ok = ok.any(axis=-1)
    w = np.where(any_ok, np.take_along_axis(w, first[..., None], -1)[..., 0], 1.0)
    h = np.where(any_ok, np.take_along_axis(h, first[..., None], -1)[..., 0], 1.0)
    x0 = rng.uniform(0.0, 1.0, size=(n, k)) * (1.0 - w)
    y0 = rng.uniform(0.0, 1.0, size=(n, k)) * (1.0 - h)
    flip = (rng.uniform(0.0, 1.0, size=(n, k)) < flip_p).astype(np.float64)
    return np.stack([x0, y0, w, h, flip], axis=-1).astype(np.float32)
