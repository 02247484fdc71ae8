"""One decode per image for every teacher: the DataLoader side of `distill cache`.

Decoding a JPEG costs about as much as a small model's forward pass, so `distill cache` opens each image once
(in a DataLoader worker when num_workers >= 1) and runs every pending teacher's own preprocessing on that one
decoded image: its eval transform, or with stored views its view transform once per view. A row goes only
through the transforms of the teachers that still need it (per-teacher `done` masks differ after adding a
teacher or after a kill); teachers whose transforms are provably identical share one tensor: the base class's,
built from equal `PreprocessCfg`s, or a back-end's own pipeline of known deterministic steps with equal
parameters (open_clip's Compose), so nine open_clip teachers at 224 px resize each image once, not nine times.
Captions are tokenised here too (in the collate function, so in the workers), once per teacher and batch. A
bad sample (missing or corrupt image, empty caption, a transform that
fails, an image over the pixel limit) travels back as a record, never an exception in a worker, and is bad for
every teacher.

Images are decoded under `DecodeLimits` (cache.sources.image_decode): over `max_pixels` a row is bad before any pixel is
decoded, and a JPEG at least twice as large as the largest input any teacher needs (`TeacherInput.min_side`) is
decoded at a reduced scale that still covers it.
"""

from __future__ import annotations

import enum
import math
import types
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from cache.build.views import RATIO, SCALE, ViewDist
from cache.sources.base import BadSampleError, Corpus
from cache.sources.image_decode import DEFAULT_MAX_PIXELS, DecodeLimits
from teachers.base import Teacher


@dataclass(frozen=True)
class TeacherInput:
    """How one teacher's input is made from a decoded image; teachers with equal `key`s share the tensor."""

    name: str
    key: Hashable  # identifies the transform: equal keys give equal tensors
    transform: Callable  # PIL -> tensor, or (PIL, view params) -> tensor when views are used
    min_side: int = 0  # shorter image side its input size needs (from preprocess_cfg; 0: full decode)
    tokenize: Callable[[list[str]], torch.Tensor] | None = None  # captions -> tokens (None: no text)


def needed_side(image_size: Sequence[int], min_area: float = 1.0, min_ratio: float = 1.0) -> int:
    """The shorter image side that still covers `image_size` after a crop of at least `min_area` of the image at
    an aspect ratio of at least `min_ratio` (the crop's narrower side is >= sqrt(min_area * min_ratio))."""
    return math.ceil(max(image_size) / math.sqrt(min_area * min(min_ratio, 1.0)))


# steps whose output depends only on the image and their public attributes (no randomness, no hidden state)
_PURE_STEPS = {
    f"torchvision.transforms.transforms.{n}"
    for n in ("Compose", "Resize", "CenterCrop", "ToTensor", "PILToTensor", "Normalize", "ConvertImageDtype")
}
_PURE_STEPS |= {f"open_clip.transform.{n}" for n in ("MaybeConvertMode", "MaybeToTensor", "CenterCropOrPad")}
_UNSURE = object()


def transform_key(obj) -> Hashable | None:
    """A key equal for two transforms only when they provably compute the same tensor from the same image: a
    pipeline of `_PURE_STEPS` with equal attributes, or the same module-level function; None when unsure."""
    key = _key(obj)
    return None if key is _UNSURE else key


def _key(obj):
    if obj is None or isinstance(obj, (str, int, float, bool, enum.Enum)):
        return obj
    if isinstance(obj, (list, tuple)):
        parts = tuple(_key(x) for x in obj)
        return _UNSURE if any(p is _UNSURE for p in parts) else ("seq", parts)
    if isinstance(obj, types.FunctionType):  # a module-level function is one object; a closure may hold state
        return obj if obj.__closure__ is None and "<locals>" not in obj.__qualname__ else _UNSURE
    cls = type(obj)
    if f"{cls.__module__}.{cls.__qualname__}" not in _PURE_STEPS:
        return _UNSURE
    state = dict(vars(obj))
    if isinstance(obj, torch.nn.Module):
        if obj._parameters or obj._buffers:
            return _UNSURE
        state = {k: v for k, v in state.items() if not k.startswith("_") and k != "training"}
    parts = tuple((k, _key(v)) for k, v in sorted(state.items()))
    return _UNSURE if any(p is _UNSURE for _, p in parts) else (cls, parts)


def teacher_inputs(teachers: dict, views: bool | ViewDist) -> list[TeacherInput]:
    """Each teacher's transform and tokenizer; transforms that provably compute the same tensor share a key:
    base-class transforms of equal preprocessing configs, or back-ends' pipelines with equal `transform_key`s.
    `views`: the stored views' ViewDist (True: the default one), whose smallest crop bounds the JPEG draft."""
    out = []
    for name, t in teachers.items():
        attr = "view_transform" if views else "image_transform"
        transform = getattr(t, attr)
        if getattr(type(t), attr) is getattr(Teacher, attr):  # not overridden: a function of the cfg alone
            key: Hashable = (attr, t.preprocess_cfg)
        else:
            own = transform_key(transform)
            key = (attr, name) if own is None else (attr, "pipeline", own)
        size = t.preprocess_cfg.image_size
        crop = views.min_crop() if isinstance(views, ViewDist) else (SCALE[0], RATIO[0])
        side = needed_side(size, *crop) if views else needed_side(size)
        out.append(TeacherInput(name, key, transform, side, t.tokenize))
    return out


class ImageBatch(NamedTuple):
    size: int  # rows in the batch, good and bad
    inputs: dict[str, tuple[list[int], torch.Tensor]]  # teacher -> (its good rows, their stacked inputs)
    bad: list[tuple[int, str, str]]  # (row, reason, where)
    tokens: dict[str, torch.Tensor]  # teacher -> its good rows' caption tokens (same order)


class ImageRows(Dataset):
    """Item j: corpus row `rows[j]` decoded once and transformed for each teacher flagged in `need[j]`."""

    def __init__(
        self,
        corpus: Corpus,
        rows: np.ndarray,
        need: np.ndarray,
        inputs: Sequence[TeacherInput],
        view_params: np.ndarray | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
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
        """(row, {teacher: tensor} or None, bad reason, where, caption)."""
        row = int(self.rows[j])
        caption = self.corpus.captions[row]
        if not caption.strip():
            return row, None, "empty caption", self.corpus.describe(row), caption
        try:
            img = self.corpus.load_image(row)
        except BadSampleError as e:
            return row, None, e.reason, e.where, caption
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
            return (row, None, f"image transform failed ({type(e).__name__}: {e})", self.corpus.describe(row), caption)
        return row, out, None, None, caption


class CollateRows:
    """Per teacher, the rows of the batch it needs (in batch order), their inputs stacked and their captions
    tokenised: in the worker that made the batch, so the main process only runs the teachers."""

    def __init__(self, inputs: Sequence[TeacherInput] = ()):
        self.tokenizers = {ti.name: ti.tokenize for ti in inputs if ti.tokenize is not None}

    def __call__(self, items) -> ImageBatch:
        rows: dict[str, list[int]] = {}
        tensors: dict[str, list[torch.Tensor]] = {}
        captions: dict[str, list[str]] = {}
        bad = []
        for row, x, reason, where, caption in items:
            if x is None:
                bad.append((row, reason, where))
                continue
            for name, t in x.items():
                rows.setdefault(name, []).append(row)
                tensors.setdefault(name, []).append(t)
                captions.setdefault(name, []).append(caption)
        inputs = {name: (rows[name], torch.stack(tensors[name])) for name in rows}
        tokens = {name: self.tokenizers[name](captions[name]) for name in rows if name in self.tokenizers}
        return ImageBatch(len(items), inputs, bad, tokens)
