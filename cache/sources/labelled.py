"""Labelled sources for `cache.corpus_build`: a MedMNIST `.npz`, a CSV/TSV of labels and metadata, or a folder
with one subfolder per class, each read into one `SourceTable` (rows of metadata, images, labels, keys).

Reading checks what can be checked without the templates: the file and split exist, the image column is there,
labels are valid indices of `class_names`, keys are unique. Caption templates are checked in `corpus_build`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from cache.sources.base import CorpusError, read_utf8_text
from cache.sources.csv_rows import read_delimited

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
NPZ_SPLITS = ("train", "val", "test")


class CorpusBuildError(CorpusError):
    """A source or recipe cannot be turned into a corpus: the message names the file, row or option to fix."""


@dataclass(frozen=True)
class CorpusSource:
    """One labelled source of a corpus build; the fields are also the keys of a recipe entry."""

    path: str                                   # a MedMNIST-style .npz, a CSV/TSV, or a folder of class folders
    templates: tuple[str, ...]                  # captions from columns: "dermoscopy of a {diagnosis}"; "{caption}"
    name: str | None = None                     # source name (default: the file stem); prefixes keys, image folder
    domain: str | None = None                   # constant `domain` value (default: the source name); or
    domain_column: str | None = None            # take `domain` from this column
    split: str | None = None                    # npz: train/val/test (default all); CSV: a split_column value;
                                                # folder: a subfolder (default: the folder itself)
    split_column: str = "split"                 # CSV column holding the split
    image_column: str = "image"                 # CSV column with image paths (relative to the CSV, or absolute)
    label_column: str | None = "label"          # CSV label column (ignored when the CSV has none); None: no label
    class_names: tuple[str, ...] | None = None  # names of integer labels: {label} gives the name
    fraction: float = 1.0                       # keep this seeded, label-stratified fraction: part (0, fraction)
    part: tuple[float, float] | None = None     # keep ranks [a, b) of the seeded stratified order; parts of the
                                                # same source and seed are disjoint and together cover it
    max_rows: int | None = None                 # then keep at most this many (a seeded random subset)

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
            raise CorpusBuildError(f"{who}: give at least one non-empty caption template, e.g. "
                                   "'dermoscopy of a {diagnosis} on the {localization}' or '{caption}'")
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
    origin: str                          # the file or folder, for messages
    columns: list[str]                   # metadata columns a template may use (besides `label`)
    rows: list[dict[str, str]]           # metadata values per row
    where: list[str]                     # "FILE row N (line L)" per row, for messages
    keys: list[str]                      # per-source part of the key (unique within the source)
    images: list[str] | np.ndarray       # absolute image paths, or a uint8 array (N, H, W[, 3])
    labels: list[str] | None = None      # raw label per row (None: the source has no labels)

    def __len__(self) -> int:
        return len(self.keys)


def read_source(src: CorpusSource) -> SourceTable:
    path = Path(src.path)
    if not path.exists():
        raise CorpusBuildError(f"source {path} not found")
    if path.is_dir():
        table = _read_folder(src, path)
    elif path.suffix.lower() == ".npz":
        table = _read_npz(src, path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        table = _read_csv(src, path)
    else:
        raise CorpusBuildError(f"source {path}: unknown format; expected a MedMNIST-style .npz, a .csv or .tsv, "
                               "or a folder with one subfolder per class")
    if src.class_names is not None and table.labels is not None:
        n = len(src.class_names)
        for i, raw in enumerate(table.labels):
            for tok in raw.split("|") if raw else []:
                if not (tok.isdigit() and int(tok) < n):
                    raise CorpusBuildError(f"{table.where[i]}: label {raw!r} is not a class index 0..{n - 1} "
                                           f"of class_names ({', '.join(src.class_names)})")
    return table


# -- npz -----------------------------------------------------------------------------------------------
def _read_npz(src: CorpusSource, path: Path) -> SourceTable:
    with np.load(path, allow_pickle=False) as z:
        files = set(z.files)
        present = [s for s in NPZ_SPLITS if f"{s}_images" in files] + sorted(
            k[: -len("_images")] for k in files if k.endswith("_images") and k[: -len("_images")] not in NPZ_SPLITS)
        if src.split is not None:
            if f"{src.split}_images" not in files or f"{src.split}_labels" not in files:
                raise CorpusBuildError(f"{path}: no split {src.split!r} (keys {src.split}_images and "
                                       f"{src.split}_labels); splits here: {', '.join(present) or 'none'}")
            present = [src.split]
        if not present:
            raise CorpusBuildError(f"{path}: no SPLIT_images arrays (keys: {', '.join(sorted(files))}); "
                                   "expected MedMNIST keys such as train_images and train_labels")
        images, labels, rows, where, keys = [], [], [], [], []
        for split in present:
            ik, lk = f"{split}_images", f"{split}_labels"
            if lk not in files:
                raise CorpusBuildError(f"{path}: {ik} has no {lk}")
            imgs, labs = z[ik], z[lk]
            if imgs.dtype != np.uint8 or not (imgs.ndim == 3 or (imgs.ndim == 4 and imgs.shape[-1] in (1, 3))):
                raise CorpusBuildError(f"{path}: {ik} must be uint8 (N, H, W) grey or (N, H, W, 3) RGB images, "
                                       f"got {imgs.dtype} {imgs.shape} (3D volumes are not supported)")
            if imgs.ndim == 4 and imgs.shape[-1] == 1:
                imgs = imgs[..., 0]
            if len(labs) != len(imgs):
                raise CorpusBuildError(f"{path}: {ik} has {len(imgs)} rows but {lk} has {len(labs)}")
            labs = np.asarray(labs).reshape(len(labs), -1)
            if labs.shape[1] == 1:  # one class per image
                lab_str = [str(int(v)) for v in labs[:, 0]]
            else:  # multi-hot: the positive class indices, joined with '|'
                lab_str = ["|".join(str(j) for j in np.flatnonzero(r)) for r in labs]
            images.append(imgs)
            labels += lab_str
            rows += [{"split": split} for _ in range(len(imgs))]
            where += [f"{path} {ik}[{i}]" for i in range(len(imgs))]
            keys += [f"{split}/{i}" for i in range(len(imgs))]
    shapes = {a.shape[1:] for a in images}
    stacked = np.concatenate(images) if len(shapes) == 1 else [img for a in images for img in a]
    return SourceTable(src, str(path), ["split"], rows, where, keys, stacked, labels)


# -- CSV -----------------------------------------------------------------------------------------------
def _read_csv(src: CorpusSource, path: Path) -> SourceTable:
    raw_rows, lines = [], []
    try:  # not UTF-8, a quote never closed, a row of the wrong width, a huge cell: named at the line of the row
        text = read_utf8_text(path)
        columns, records = read_delimited(str(path), text, "\t" if path.suffix.lower() == ".tsv" else ",")
        for line, row in records:
            raw_rows.append(row)
            lines.append(line)
    except CorpusError as e:
        raise CorpusBuildError(str(e)) from None
    listed = ", ".join(columns) or "none"
    if src.image_column not in columns:
        raise CorpusBuildError(f"{path}: image column {src.image_column!r} not found (columns: {listed}); "
                               "set image_column")
    if src.split is not None and src.split_column not in columns:
        raise CorpusBuildError(f"{path}: split {src.split!r} asked for, but split column {src.split_column!r} is "
                               f"not there (columns: {listed}); set split_column, or drop split")
    if src.domain_column is not None and src.domain_column not in columns:
        raise CorpusBuildError(f"{path}: domain column {src.domain_column!r} not found (columns: {listed})")
    has_label = src.label_column is not None and src.label_column in columns
    root = path.parent.resolve()
    rows, where, keys, images, labels = [], [], [], [], []
    seen: dict[str, str] = {}
    for n, (row, line) in enumerate(zip(raw_rows, lines), start=1):
        if src.split is not None and row[src.split_column] != src.split:
            continue
        here = f"{path} row {n} (line {line})"
        rel = (row[src.image_column] or "").strip()
        if not rel:
            raise CorpusBuildError(f"{here}: empty {src.image_column!r}")
        if rel in seen:
            raise CorpusBuildError(f"{here}: image {rel!r} is listed twice (first on {seen[rel]}); keys must be "
                                   "unique")
        seen[rel] = here
        p = Path(os.path.expanduser(rel))
        images.append(os.path.normpath(p if p.is_absolute() else root / p))
        keys.append(rel)
        rows.append({c: (row[c] or "") for c in columns if c != src.image_column})
        where.append(here)
        if has_label:
            labels.append((row[src.label_column] or "").strip())
    if not raw_rows:
        raise CorpusBuildError(f"{path}: no rows (a header and nothing else)")
    if not rows:
        raise CorpusBuildError(f"{path}: no row has {src.split_column} == {src.split!r} (values: "
                               f"{', '.join(sorted({r[src.split_column] for r in raw_rows}))})")
    meta = [c for c in columns if c != src.image_column]
    return SourceTable(src, str(path), meta, rows, where, keys, images, labels if has_label else None)


# -- folder per class ----------------------------------------------------------------------------------
def _read_folder(src: CorpusSource, path: Path) -> SourceTable:
    if src.class_names is not None:
        raise CorpusBuildError(f"{path}: a folder source takes its class names from the subfolder names; "
                               "drop class_names")
    root = path / src.split if src.split is not None else path
    if not root.is_dir():
        raise CorpusBuildError(f"{path}: split folder {src.split!r} not found")
    rows, where, keys, images, labels = [], [], [], [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            rel = f.relative_to(path).as_posix()
            images.append(os.path.normpath(f.resolve()))
            keys.append(rel)
            labels.append(d.name)
            rows.append({"split": src.split} if src.split is not None else {})
            where.append(f"{path}: {rel}")
    if not images:
        raise CorpusBuildError(f"{root}: no images ({'/'.join(IMAGE_SUFFIXES)}) in class subfolders")
    return SourceTable(src, str(path), ["split"] if src.split is not None else [], rows, where, keys, images,
                       labels)


def check_unique_names(sources: Sequence[CorpusSource]) -> None:
    seen: dict[str, str] = {}
    for s in sources:
        n = s.source_name
        if not n or "/" in n or "\\" in n or n in (".", ".."):
            raise CorpusBuildError(f"source {s.path}: name {n!r} cannot name a folder; set name")
        if n in seen:
            raise CorpusBuildError(f"two sources are named {n!r} ({seen[n]} and {s.path}); give each a distinct "
                                   "name (keys and image folders are prefixed with it)")
        seen[n] = s.path
