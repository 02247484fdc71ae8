"""Augmented views drawn once per sample and stored, so every teacher (and the student) sees the same pixels.

A view is the relative crop box (x0, y0, w, h), a flip flag and, when photometric jitter was asked for, three
factors (brightness, contrast, saturation; 1.0 = unchanged), applied by `teachers.transforms.apply_view` before
each model's own resize and normalisation. The distribution they were drawn from (`ViewDist`) is stored as
attributes of /views/params, shown by `distill info`, and checked against a later run's flags and a training
config's own crop settings, so neither can silently disagree with what the teachers saw.
Why 8 columns only with jitter: without it a file keeps the 5-column layout every earlier version reads.
Why no flips by default: in radiology left and right are findings (situs, laterality of a lesion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import numpy as np

import cache.store.layout as L

SCALE = (0.5, 1.0)
RATIO = (3 / 4, 4 / 3)
FLIP_P = 0.0  # opt in with --view-flip P where laterality does not matter
COLOR = 0.0  # no photometric jitter; --view-color S


def _num(x: float) -> str:
    return f"{float(x):.6g}"


def _close(a, b) -> bool:
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-4, atol=1e-6))


@dataclass(frozen=True)
class ViewDist:
    """How the stored views are drawn (torchvision RandomResizedCrop, RandomHorizontalFlip, ColorJitter)."""

    views: int  # K views per image
    scale: tuple[float, float] = SCALE  # crop area fraction ~ U(scale)
    ratio: tuple[float, float] = RATIO  # crop aspect ratio, log-uniform in ratio
    flip_p: float = FLIP_P  # probability of a horizontal flip
    color: float = COLOR  # S: brightness, contrast, saturation ~ U(max(0, 1-S), 1+S) each
    seed: int = 0  # the draw is a function of (rows, this) alone

    # the CLI flag of each field a run may ask for (None: as stored, or the default for a new file)
    FLAGS = {"scale": "--view-scale", "ratio": "--view-ratio", "flip_p": "--view-flip", "color": "--view-color"}

    def problem(self) -> str | None:
        """Why this distribution cannot be drawn, or None."""
        (s0, s1), (r0, r1) = self.scale, self.ratio
        if self.views < 1:
            return f"views={self.views}; use --views K with K >= 1"
        if not 0 < s0 <= s1 <= 1:
            return f"--view-scale {_num(s0)},{_num(s1)}: use 0 < MIN <= MAX <= 1 (area fractions)"
        if not 0 < r0 <= r1:
            return f"--view-ratio {_num(r0)},{_num(r1)}: use 0 < MIN <= MAX (width / height)"
        if not 0 <= self.flip_p <= 1:
            return f"--view-flip {_num(self.flip_p)}: use a probability in [0, 1]"
        if not 0 <= self.color <= 1:
            return f"--view-color {_num(self.color)}: use S in [0, 1] (factors drawn in [1-S, 1+S])"
        return None

    @property
    def fields(self) -> int:
        return L.VIEW_COLOR_FIELDS if self.color > 0 else L.VIEW_FIELDS

    def min_crop(self) -> tuple[float, float]:
        """(smallest area fraction, smallest aspect of the crop's narrow side): how far a decode may shrink."""
        return self.scale[0], min(self.ratio[0], 1.0 / self.ratio[1])

    def draw(self, n: int, attempts: int = 10) -> np.ndarray:
        """(n, K, 5), or (n, K, 8) with colour jitter, float32; see `draw_view_params`."""
        return draw_view_params(n, self.views, self.seed, self.scale, self.ratio, self.flip_p, self.color, attempts)

    def to_attrs(self) -> dict:
        A = L.ViewAttrs
        cols = L.VIEW_COLUMNS[: self.fields]
        return {
            A.VIEWS: int(self.views),
            A.SCALE: [float(x) for x in self.scale],
            A.RATIO: [float(x) for x in self.ratio],
            A.FLIP_P: float(self.flip_p),
            A.COLOR: float(self.color),
            A.SEED: int(self.seed),
            A.LAYOUT: ", ".join(cols),
        }

    @classmethod
    def from_attrs(cls, attrs, views: int) -> ViewDist:
        """The stored distribution; a key a hand-made file lacks reads as the default."""
        A = L.ViewAttrs
        get = attrs.get
        return cls(
            int(views),
            cast("tuple[float, float]", tuple(float(x) for x in get(A.SCALE, SCALE))),  # written as 2 numbers
            cast("tuple[float, float]", tuple(float(x) for x in get(A.RATIO, RATIO))),
            float(get(A.FLIP_P, FLIP_P)),
            float(get(A.COLOR, COLOR)),
            int(get(A.SEED, 0)),
        )

    def flag_value(self, field: str) -> str:
        v = getattr(self, field)
        return ",".join(_num(x) for x in v) if isinstance(v, tuple) else _num(v)

    def flags(self) -> str:
        """The `distill cache` flags that ask for exactly this distribution."""
        return " ".join([f"--views {self.views}", *(f"{f} {self.flag_value(k)}" for k, f in self.FLAGS.items())])

    def differences(self, asked: dict) -> list[str]:
        """`asked` (field -> value, as given on the command line) where it differs from this, as flags."""
        return [
            f"{self.FLAGS[k]} {ViewDist(1, **{k: v}).flag_value(k)}"
            for k, v in asked.items()
            if not _close(v, getattr(self, k))
        ]

    def describe(self) -> str:
        """One line for `distill info`: K, seed, then the distribution."""
        flips = "no flips" if self.flip_p == 0 else f"flip p {_num(self.flip_p)}"
        color = (
            f"colour jitter S {_num(self.color)} (brightness, contrast, saturation)"
            if self.color > 0
            else "no colour jitter"
        )
        return (
            f"{self.views} per image (seed {self.seed}): scale {self.flag_value('scale').replace(',', '-')}, "
            f"ratio {self.flag_value('ratio').replace(',', '-')}, {flips}, {color}"
        )


def read_view_dist(f) -> ViewDist | None:
    """The distribution of the views stored in `f` (an open h5py.File, or a path), None when it has none."""
    if isinstance(f, (str, bytes)) or hasattr(f, "__fspath__"):
        import h5py  # noqa: PLC0415 (lazy: h5py kept off the light CLI path, which loads this module)

        with h5py.File(f, "r") as h:
            return read_view_dist(h)
    if L.VIEW_PARAMS not in f:
        return None
    ds = f[L.VIEW_PARAMS]
    return ViewDist.from_attrs(ds.attrs, ds.shape[1])


def draw_view_params(
    n: int,
    k: int,
    seed: int = 0,
    scale=SCALE,
    ratio=RATIO,
    flip_p: float = FLIP_P,
    color: float = COLOR,
    attempts: int = 10,
) -> np.ndarray:
    """(n, k, 5) float32: RandomResizedCrop-style boxes in relative coordinates, plus a flip flag; with
    `color` S > 0, (n, k, 8): plus brightness, contrast and saturation factors ~ U(max(0, 1-S), 1+S).

    Like torchvision's RandomResizedCrop: area fraction ~ U(scale), log aspect ~ U(log ratio), up to
    `attempts` tries for a box that fits, else the whole image. Deterministic in its arguments alone, so every
    process of a multi-process run draws the same array; the colour factors are drawn after everything else,
    so the boxes and flips of a seed are the same with or without jitter.
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
    cols = [x0, y0, w, h, flip]
    if color > 0:
        factors = rng.uniform(max(0.0, 1.0 - color), 1.0 + color, size=(3, n, k))
        cols += list(factors)
    return np.stack(cols, axis=-1).astype(np.float32)
