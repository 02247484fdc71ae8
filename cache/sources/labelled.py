"""Labelled sources for `cache.corpus_build`: a MedMNIST `.npz`, a CSV/TSV of labels and metadata, a folder
with one subfolder per class, or any registered format with labelled rows, each read through its format's reader
(`cache.sources.corpus.read_labelled`, the readers eval datasets use too) into one `SourceTable` (rows of
metadata, images, labels, keys).

Reading checks what can be checked without the templates: the file and split exist, the image column is there,
labels are valid indices of `class_names`, keys are unique. Caption templates are checked in `corpus_build`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from cache.sources.base import CorpusError
from cache.sources.corpus import read_labelled
from cache.sources.formats import LabelledData
from cache.sources.image_decode import IMAGE_SUFFIXES


class CorpusBuildError(CorpusError):
    """A source or recipe cannot be turned into a corpus: the message names the file, row or option to fix."""


@dataclass(frozen=True)
class CorpusSource:
    """One labelled source of a corpus build; the fields are also the keys of a recipe entry."""

    path: str  # a MedMNIST-style .npz, a CSV/TSV, or a folder of class folders
    templates: tuple[str, ...]  # captions from columns: "dermoscopy of a {diagnosis}"; "{caption}"
    name: str | None = None  # source name (default: the file stem); prefixes keys, image folder
    domain: str | None = None  # constant `domain` value (default: the source name); or
    domain_column: str | None = None  # take `domain` from this column
    split: str | None = None  # npz: train/val/test (default all); CSV: a split_column value;
    # folder: a subfolder (default: the folder itself)
    split_column: str = "split"  # CSV column holding the split
    image_column: str = "image"  # CSV column with image paths (relative to the CSV, or absolute)
    label_column: str | None = "label"  # CSV label column (ignored when the CSV has none); None: no label
    class_names: tuple[str, ...] | None = None  # names of integer labels: {label} gives the name
    fraction: float = 1.0  # keep this seeded, label-stratified fraction: part (0, fraction)
    part: tuple[float, float] | None = None  # keep ranks [a, b) of the seeded stratified order; parts of the
    # same source and seed are disjoint and together cover it
    max_rows: int | None = None  # then keep at most this many (a seeded random subset)

    def __post_init__(self):
        # recipes give lists; the dataclass is frozen and hashable, so store tuples
        if isinstance(self.templates, str):
            object.__setattr__(self, "templates", (self.templates,))
        object.__setattr__(self, "templates", tuple(self.templates))
        if isinstance(self.class_names, str):
            object.__setattr__(self, "class_names", tuple(c.strip() for c in self.class_names.split(",")))
        elif self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        if self.part is not None:
            object.__setattr__(self, "part", tuple(float(x) for x in self.part))
        who = f"source {self.path}"
        if not self.templates or not all(isinstance(t, str) and t.strip() for t in self.templates):
            raise CorpusBuildError(
                f"{who}: give at least one non-empty caption template, e.g. "
                "'dermoscopy of a {diagnosis} on the {localization}' or '{caption}'"
            )
        if self.domain is not None and self.domain_column is not None:
            raise CorpusBuildError(f"{who}: give domain (a constant) or domain_column, not both")
        if not 0.0 <= float(self.fraction) <= 1.0:
            raise CorpusBuildError(f"{who}: fraction must be in [0, 1], got {self.fraction}")
        if self.part is not None:
            if len(self.part) != 2 or not 0.0 <= self.part[0] <= self.part[1] <= 1.0:
                raise CorpusBuildError(f"{who}: part must be two numbers 0 <= a <= b <= 1, got {list(self.part)}")
            if float(self.fraction) != 1.0:
                raise CorpusBuildError(f"{who}: give fraction (= part [0, fraction]) or part, not both")
        if self.max_rows is not None and (not isinstance(self.max_rows, int) or self.max_rows < 0):
            raise CorpusBuildError(f"{who}: max_rows must be a whole number >= 0, got {self.max_rows!r}")

    @property
    def source_name(self) -> str:
        return self.name or Path(self.path).stem

    @property
    def kept_part(self) -> tuple[float, float]:
        return self.part if self.part is not None else (0.0, float(self.fraction))


SOURCE_FIELDS = tuple(f.name for f in fields(CorpusSource))


@dataclass(eq=False)
class SourceTable:
    """One source read into rows; row i has metadata `rows[i]`, image `images[i]` and key `<name>/keys[i]`."""

    source: CorpusSource
    origin: str  # the file or folder, for messages
    columns: list[str]  # metadata columns a template may use (besides `label`)
    rows: list[dict[str, str]]  # metadata values per row
    where: list[str]  # "FILE row N (line L)" per row, for messages
    keys: list[str]  # per-source part of the key (unique within the source)
    images: list[str] | np.ndarray | list[np.ndarray]  # absolute image paths, or uint8 arrays (N, H, W[, 3])
    labels: list[str] | None = None  # raw label per row (None: the source has no labels)

    def __len__(self) -> int:
        return len(self.keys)


def read_source(src: CorpusSource) -> SourceTable:
    """Read one source through its format's reader (`cache.sources.corpus.read_labelled`): file-level problems
    (not UTF-8, a bad row, a missing npz split) are the reader's, named at their line; the columns, labels and
    keys this build needs are checked here."""
    path = Path(src.path)
    if not path.exists():
        raise CorpusBuildError(f"source {path} not found")
    if path.is_dir() and src.class_names is not None:
        raise CorpusBuildError(
            f"{path}: a folder source takes its class names from the subfolder names; drop class_names"
        )
    try:  # a format without labelled rows, or a file it refuses: one line naming the file and line
        data = read_labelled(path, split=src.split, what="source")
    except CorpusBuildError:
        raise
    except CorpusError as e:
        raise CorpusBuildError(str(e)) from None
    if data.images is None:
        table = _from_table(src, path, data)
    else:
        table = _from_images(src, path, data)
    if src.class_names is not None and table.labels is not None:
        n = len(src.class_names)
        for i, raw in enumerate(table.labels):
            for tok in raw.split("|") if raw else []:
                if not (tok.isdigit() and int(tok) < n):
                    raise CorpusBuildError(
                        f"{table.where[i]}: label {raw!r} is not a class index 0..{n - 1} "
                        f"of class_names ({', '.join(src.class_names)})"
                    )
    return table


def _label_text(labels: list[str] | np.ndarray) -> list[str]:
    """Raw labels as text: an (N, 1) array -> the index; an (N, C) multi-hot array -> positive indices joined by
    '|'; names (class folders) as they are."""
    if not isinstance(labels, np.ndarray):
        return list(labels)
    if labels.shape[1] == 1:  # one class per image
        return [str(int(v)) for v in labels[:, 0]]
    return ["|".join(str(j) for j in np.flatnonzero(r)) for r in labels]


def _from_images(src: CorpusSource, path: Path, data: LabelledData) -> SourceTable:
    """An npz or a class folder (or any format whose rows carry their images)."""
    if not len(data):
        raise CorpusBuildError(
            f"{path / src.split if src.split else path}: no images ({'/'.join(IMAGE_SUFFIXES)}) in class subfolders"
            if path.is_dir()
            else f"{path}: no rows"
        )
    labels = None if data.labels is None else _label_text(data.labels)
    if data.keys is None or data.images is None:  # a reader whose rows carry their images names their keys too
        raise TypeError(f"{path}: the format's reader returned images without keys")
    return SourceTable(
        src, data.origin, list(data.columns), data.rows, data.where, list(data.keys), data.images, labels
    )


def _from_table(src: CorpusSource, path: Path, data: LabelledData) -> SourceTable:
    """A CSV/TSV: the image, split, domain and label columns are this source's options."""
    columns, raw_rows = data.columns, data.rows
    listed = ", ".join(columns) or "none"
    if src.image_column not in columns:
        raise CorpusBuildError(
            f"{path}: image column {src.image_column!r} not found (columns: {listed}); set image_column"
        )
    if src.split is not None and src.split_column not in columns:
        raise CorpusBuildError(
            f"{path}: split {src.split!r} asked for, but split column {src.split_column!r} is "
            f"not there (columns: {listed}); set split_column, or drop split"
        )
    if src.domain_column is not None and src.domain_column not in columns:
        raise CorpusBuildError(f"{path}: domain column {src.domain_column!r} not found (columns: {listed})")
    label_column = src.label_column if src.label_column is not None and src.label_column in columns else None
    has_label = label_column is not None
    root = path.parent.resolve()
    rows, where, keys, images, labels = [], [], [], [], []
    seen: dict[str, str] = {}
    for row, here in zip(raw_rows, data.where):
        if src.split is not None and row[src.split_column] != src.split:
            continue
        rel = (row[src.image_column] or "").strip()
        if not rel:
            raise CorpusBuildError(f"{here}: empty {src.image_column!r}")
        if rel in seen:
            raise CorpusBuildError(f"{here}: image {rel!r} is listed twice (first on {seen[rel]}); keys must be unique")
        seen[rel] = here
        p = Path(os.path.expanduser(rel))
        images.append(os.path.normpath(p if p.is_absolute() else root / p))
        keys.append(rel)
        rows.append({c: (row[c] or "") for c in columns if c != src.image_column})
        where.append(here)
        if label_column is not None:
            labels.append((row[label_column] or "").strip())
    if not raw_rows:
        raise CorpusBuildError(f"{path}: no rows (a header and nothing else)")
    if not rows:
        raise CorpusBuildError(
            f"{path}: no row has {src.split_column} == {src.split!r} (values: "
            f"{', '.join(sorted({r[src.split_column] for r in raw_rows}))})"
        )
    meta = [c for c in columns if c != src.image_column]
    return SourceTable(src, str(path), meta, rows, where, keys, images, labels if has_label else None)


def check_unique_names(sources: Sequence[CorpusSource]) -> None:
    seen: dict[str, str] = {}
    for s in sources:
        n = s.source_name
        if not n or "/" in n or "\\" in n or n in (".", ".."):
            raise CorpusBuildError(f"source {s.path}: name {n!r} cannot name a folder; set name")
        if n in seen:
            raise CorpusBuildError(
                f"two sources are named {n!r} ({seen[n]} and {s.path}); give each a distinct "
                "name (keys and image folders are prefixed with it)"
            )
        seen[n] = s.path
