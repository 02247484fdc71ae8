"""One decode per image for every teacher: the DataLoader side of `distill cache`.

Decoding a JPEG costs about as much as a small model's forward pass, so `distill cache` opens each image once
(in a DataLoader worker when num_workers >= 1) and runs every pending teacher's own preprocessing on that one
decoded image: its eval transform, or with stored views its view transform once per view. A row goes only
through the transforms of the teachers that still need it (per-teacher `done` masks differ after adding a
teacher or after a kill); teachers whose transforms are provably identical (the base class's, built from equal
`PreprocessCfg`s) share one tensor. A bad sample (missing or corrupt image, empty caption, a transform that
fails, an image over the pixel limit) travels back as a record, never an exception in a worker, and is bad for
every teacher.

Images are decoded under `DecodeLimits` (cache.image_decode): over `max_pixels` a row is bad before any pixel is
decoded, and a JPEG at least twice as large as the largest input any teacher needs (`TeacherInput.min_side`) is
decoded at a reduced scale that still covers it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .corpus_base import BadSampleError, Corpus
from .image_decode import DEFAULT_MAX_PIXELS, DecodeLimits
from .views import RATIO, SCALE


@dataclass(frozen=True)
class TeacherInput:
    """How one teacher's input is made from a decoded image; teachers with equal `key`s share the tensor."""

    name: str
    key: Hashable                 # identifies the transform: equal keys give equal tensors
    transform: Callable           # PIL -> tensor, or (PIL, view params) -> tensor when views are used
    min_side: int = 0             # shorter image side its input size needs (from preprocess_cfg; 0: full decode)


def needed_side(image_size: Sequence[int], min_area: float = 1.0, min_ratio: float = 1.0) -> int:
    """The shorter image side that still covers `image_size` after a crop of at least `min_area` of the image at
    an aspect ratio of at least `min_ratio` (the crop's narrower side is >= sqrt(min_area * min_ratio))."""
    return math.ceil(max(image_size) / math.sqrt(min_area * min(min_ratio, 1.0)))


def teacher_inputs(teachers: dict, views: bool) -> list[TeacherInput]:
    """Each teacher's transform; base-class transforms of equal preprocessing configs share a key."""
    from teachers.base import Teacher

    out = []
    for name, t in teachers.items():
        attr = "view_transform" if views else "image_transform"
        shared = getattr(type(t), attr) is getattr(Teacher, attr)  # not overridden: a function of the cfg alone
        key = (attr, t.preprocess_cfg) if shared else (attr, name)
        size = t.preprocess_cfg.image_size
        side = needed_side(size, SCALE[0], RATIO[0]) if views else needed_side(size)
        out.append(TeacherInput(name, key, getattr(t, attr), side))
    return out


class ImageBatch(NamedTuple):
    size: int                                          # rows in the batch, good and bad
    inputs: dict[str, tuple[list[int], torch.Tensor]]  # teacher -> (its good rows, their stacked inputs)
    bad: list[tuple[int, str, str]]                    # (row, reason, where)


class ImageRows(Dataset):
    """Item j: corpus row `rows[j]` decoded once and transformed for each teacher flagged in `need[j]`."""

    def __init__(self, corpus: Corpus, rows: np.ndarray, need: np.ndarray, inputs: Sequence[TeacherInput],
                 view_params: np.ndarray | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        if need.shape != (len(rows), len(inputs)):
            raise ValueError(f"need has shape {need.shape}, expected ({len(rows)}, {len(inputs)})")
        # back-ends' own transforms (open_clip, HF processors) resize to preprocess_cfg.image_size too; an input
        # with min_side 0 may need any resolution, and then every image is decoded in full
        sides = [ti.min_side for ti in inputs]
        draft = 0 if not sides or 0 in sides else max(sides)
        self.corpus = corpus.with_limits(DecodeLimits(max_pixels or None, draft_side=draft))
        self.rows, self.need = rows, need
        self.inputs, self.view_params = list(inputs), view_params

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        """(row, {teacher: tensor} or None, bad reason, where)."""
        row = int(self.rows[j])
        if not self.corpus.captions[row].strip():
            return row, None, "empty caption", self.corpus.describe(row)
        try:
            img = self.corpus.load_image(row)
        except BadSampleError as e:
            return row, None, e.reason, e.where
        made: dict[Hashable, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        try:
            for ti, needed in zip(self.inputs, self.need[j]):
                if not needed:
                    continue
                if ti.key not in made:
                    if self.view_params is not None:
                        made[ti.key] = torch.stack([ti.transform(img, p) for p in self.view_params[row]])
                    else:
                        made[ti.key] = ti.transform(img)
                out[ti.name] = made[ti.key]
        except Exception as e:  # a transform that chokes on this image: the sample is bad, not the run
            return row, None, f"image transform failed ({type(e).__name__}: {e})", self.corpus.describe(row)
        return row, out, None, None


def collate_rows(items) -> ImageBatch:
    """Per teacher, the rows of the batch it needs (in batch order) and their inputs stacked."""
    rows: dict[str, list[int]] = {}
    tensors: dict[str, list[torch.Tensor]] = {}
    bad = []
    for row, x, reason, where in items:
        if x is None:
            bad.append((row, reason, where))
            continue
        for name, t in x.items():
            rows.setdefault(name, []).append(row)
            tensors.setdefault(name, []).append(t)
    inputs = {name: (rows[name], torch.stack(tensors[name])) for name in rows}
    return ImageBatch(len(items), inputs, bad)
