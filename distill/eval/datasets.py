"""Evaluation datasets: CSV/TSV (image + label or caption), MedMNIST `.npz`, a folder per class, and WebDataset
shards (image + caption, for retrieval; local or streamed by URL, read in order), or any registered format.

Files are read by the same format readers as training corpora and `distill corpus` sources
(`cache.sources.formats`: encodings, BOMs, row checks, image suffixes, npz keys); this module maps their rows to
the task's splits, labels and captions.

Every reader returns one `SplitData` per split role (train/val/test) with the same shape: images (paths or a
uint8 array), labels (class ids, or multi-hot for multi-label tasks) and captions. Errors name the file, the row
or key and what to set in the task file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image

from cache.sources.corpus import CorpusError, Format, LabelledData, open_corpus, read_labelled
from cache.sources.formats import find_format, format_named
from cache.sources.image_decode import IMAGE_SUFFIXES
from distill.eval.tasks import DATA_ENV, SPLIT_ROLES, TaskCfg, TaskError
from student.shown_paths import shown_path


def image_paths(images) -> list[str] | None:
    """The image files of a split that names its images by path (a list or tuple of paths); None for images given
    as an array or read from a corpus."""
    if isinstance(images, (list, tuple)) and all(isinstance(p, (str, Path)) for p in images):
        return [str(p) for p in images]
    return None


@dataclass(frozen=True, eq=False)
class SplitData:
    """The samples of one split. `key` identifies it for the embedding cache."""

    key: str
    source: str  # file and split, for messages
    images: Sequence | np.ndarray | CorpusImages  # image paths, a uint8 array (N, H, W[, C]), or a corpus's rows
    labels: np.ndarray | None = None  # (N,) int64 class ids, or (N, C) float32 multi-hot
    captions: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def label(self) -> str:
        """The split as a progress bar names it: the dataset's file name and split (`data.csv (test)`), never the
        absolute path of this machine (`source`, which error messages use, keeps the path as written)."""
        where, sep, role = self.source.rpartition(" (")
        plain = sep and ":" not in where.split("/")[0]  # not a URL or pipe: command
        return f"{shown_path(where)} ({role}" if plain else self.source

    def image(self, i: int) -> Image.Image:
        item = self.images[i]
        if isinstance(item, Image.Image):  # read by a corpus (CorpusImages)
            return item.convert("RGB")
        if isinstance(item, np.ndarray):
            return Image.fromarray(item).convert("RGB")
        with Image.open(item) as img:
            return img.convert("RGB")

    def subset(self, idx: np.ndarray, tag: str) -> SplitData:
        """Rows `idx`, as a new split with its own cache key (`tag` says which subset)."""
        idx = np.asarray(idx, dtype=np.int64)
        images = (
            self.images[idx] if isinstance(self.images, (np.ndarray, CorpusImages)) else [self.images[i] for i in idx]
        )
        return SplitData(
            key=f"{self.key}::{tag}",
            source=self.source,
            images=images,
            labels=None if self.labels is None else self.labels[idx],
            captions=None if self.captions is None else tuple(self.captions[i] for i in idx),
        )


class CorpusImages:
    """A corpus's images by row (`rows`), loaded when asked: streamed shards are read in row order, once."""

    def __init__(self, corpus, rows: np.ndarray):
        self.corpus, self.rows = corpus, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, np.ndarray):  # a subset (SplitData.subset), still lazy
            return CorpusImages(self.corpus, self.rows[i])
        return self.corpus.load_image(int(self.rows[i]))


def _fmt(task: TaskCfg, path: Path | str) -> Format:
    """The format `dataset.format` names (csv covers .tsv; webdataset covers shards by URL), or the one the path
    tells: labelled rows first (CSV/TSV, .npz, a folder per class), then image-caption pairs (shards, JSONL)."""
    name, spec = task.dataset.format, str(path)
    try:
        if name == "csv":
            return format_named("tsv" if spec.lower().endswith(".tsv") else "csv", "labelled")
        if name == "webdataset":
            return find_format(spec, "corpus", "dataset")
        if name != "auto":
            return format_named(name, "labelled" if name in ("npz", "folder") else "corpus")
        for need in ("labelled", "corpus"):
            try:
                return find_format(spec, need, "dataset")
            except CorpusError:
                continue
    except CorpusError as e:
        raise TaskError(f"{task.source}: {e}") from None
    raise TaskError(
        f"{task.source}: cannot tell the format of {path} from its name; set dataset.format to csv, npz or folder"
    )


def load_splits(task: TaskCfg) -> dict[str, SplitData]:
    """The splits `task` needs (test; plus train and val for linear probe and fine-tuning)."""
    path = task.dataset_path
    if not isinstance(path, str) and "{" not in path.name and not path.exists():  # URLs: checked when opened
        raise TaskError(
            f"{task.source}: dataset {path} not found. Built-in tasks read their data from "
            f"${DATA_ENV} (default ../shared/data beside the current directory); set {DATA_ENV} "
            "to the folder holding the data, or fix dataset.path"
        )
    fmt = _fmt(task, path)
    roles = task.needs_roles()
    if fmt.name in ("csv", "tsv"):  # the task names the image, label, caption and split columns
        splits = _read_table(task, Path(path), roles, fmt)
    elif task.kind == "retrieval" or fmt.labelled is None:  # image-caption pairs (shards, JSONL, a plug-in)
        splits = _read_corpus(task, path, roles, fmt)
    elif fmt.name == "folder":
        splits = _read_folder(task, Path(path), roles)
    else:  # npz, or a plug-in whose rows carry images and (N, C) label arrays, read one split per role
        splits = _read_npz(task, Path(path), roles, fmt)
    out = {}
    for role in roles:
        data = splits[role]
        if len(data) == 0:
            raise TaskError(
                f"{task.source}: the {role} split of {data.source} is empty; check dataset.splits, "
                "dataset.split_column or dataset.split_fractions"
            )
        m = task.dataset.max_samples
        if m is not None and len(data) > m:
            # the same rows in every task
            rng = np.random.default_rng(task.dataset.seed + 1000 * (1 + SPLIT_ROLES.index(role)))
            data = data.subset(np.sort(rng.choice(len(data), m, replace=False)), f"max{m}s{task.dataset.seed}")
        out[role] = data
    return out


def _fraction_split(n: int, task: TaskCfg) -> dict[str, np.ndarray]:
    """Seeded random (train, val, test) partition of n rows by dataset.split_fractions."""
    perm = np.random.default_rng(task.dataset.seed).permutation(n)
    f = task.dataset.split_fractions
    n_train, n_val = int(round(f[0] * n)), int(round(f[1] * n))
    return {
        "train": np.sort(perm[:n_train]),
        "val": np.sort(perm[n_train : n_train + n_val]),
        "test": np.sort(perm[n_train + n_val :]),
    }


def _no_splits(task: TaskCfg, path: Path | str, roles: Sequence[str]) -> None:
    if any(r != "test" for r in roles):
        raise TaskError(
            f"{task.source}: a {task.kind} task needs train, val and test splits but {path} has none; "
            "set dataset.split_fractions (e.g. [0.6, 0.1, 0.3]) or dataset.split_column"
        )


# -- labels --------------------------------------------------------------------------------------------
def _label_lookup(task: TaskCfg) -> dict[str, int]:
    return {str(v): i for i, v in enumerate(task.label_names)}


def _parse_label(value: str, task: TaskCfg, lookup: dict[str, int], where: str) -> int | np.ndarray:
    n = len(task.classes)

    def one(tok: str) -> int:
        tok = tok.strip()
        if tok in lookup:
            return lookup[tok]
        try:
            k = int(float(tok))
        except ValueError:
            k = -1
        if 0 <= k < n and float(tok) == k:
            return k
        raise TaskError(
            f"{where}: label {tok!r} is not a known class (classes: {', '.join(task.label_names)}; "
            f"or an index 0..{n - 1}); fix the data or the task's classes/label_values"
        )

    if not task.multilabel:
        return one(value)
    hot = np.zeros(n, dtype=np.float32)
    for tok in str(value).split(task.dataset.label_separator):
        if tok.strip():
            hot[one(tok)] = 1.0
    return hot


def _read(task: TaskCfg, path: Path, fmt: Format, split: str | None = None, role: str | None = None) -> LabelledData:
    """The format's labelled rows; its one-line errors (not UTF-8, a bad row, a missing npz key) as TaskErrors."""
    try:
        return read_labelled(path, fmt.name, split, what="dataset")
    except CorpusError as e:
        hint = f" (the {role} split: set dataset.splits.{role} in {task.source})" if role else ""
        raise TaskError(f"{e}{hint}") from None


# -- CSV / TSV -----------------------------------------------------------------------------------------
def _read_table(task: TaskCfg, path: Path, roles: Sequence[str], fmt: Format) -> dict[str, SplitData]:
    ds = task.dataset
    data = _read(task, path, fmt)
    columns, rows = data.columns, data.rows
    needed = [ds.image_column]
    if task.kind == "retrieval":
        needed.append(ds.caption_column)
    elif ds.label_columns:
        needed += list(ds.label_columns)
    else:
        needed.append(ds.label_column)
    if ds.split_column:
        needed.append(ds.split_column)
    for col in needed:
        if col not in columns:
            raise TaskError(
                f"{path}: column {col!r} not found (columns: {', '.join(columns) or 'none'}); "
                f"fix the CSV or the dataset section of {task.source}"
            )
    if not rows:
        raise TaskError(
            f"{path}: the dataset is empty (a header and no rows); point dataset.path in "
            f"{task.source} at a CSV with samples"
        )
    if ds.split_column:
        index = {
            r: np.array(
                [i for i, row in enumerate(rows) if row[ds.split_column] == ds.splits.get(r, r)], dtype=np.int64
            )
            for r in roles
        }
    elif ds.split_fractions:
        index = _fraction_split(len(rows), task)
    else:
        _no_splits(task, path, roles)
        index = {"test": np.arange(len(rows))}
    lookup = _label_lookup(task)
    out = {}
    for role in roles:
        sel = index[role]
        images: list[Path] = []
        labels: list[int | np.ndarray] = []
        captions: list[str] = []
        for i in sel:
            row, where = rows[i], data.where[i]
            rel = (row[ds.image_column] or "").strip()
            if not rel:
                raise TaskError(f"{where}: empty {ds.image_column!r}")
            img = Path(rel) if Path(rel).is_absolute() else path.parent / rel
            if not img.is_file():
                raise TaskError(f"{where}: image {img} not found (paths are relative to the CSV's folder)")
            images.append(img)
            if task.kind == "retrieval":
                cap = (row[ds.caption_column] or "").strip()
                if not cap:
                    raise TaskError(f"{where}: empty caption in column {ds.caption_column!r}")
                captions.append(cap)
            elif ds.label_columns:
                try:
                    labels.append(np.array([float(row[c]) > 0 for c in ds.label_columns], dtype=np.float32))
                except ValueError:
                    raise TaskError(f"{where}: multi-hot columns {list(ds.label_columns)} must hold 0/1") from None
            else:
                labels.append(_parse_label(row[ds.label_column] or "", task, lookup, where))
        split_name = ds.splits.get(role, role) if ds.split_column else role
        key = (
            f"csv:{path.resolve()}:{ds.image_column}::{role}:{split_name}:{ds.split_column}:"
            f"{list(ds.split_fractions)}:{ds.seed}"
        )
        lab = (
            None
            if task.kind == "retrieval"
            else (np.stack(labels) if task.multilabel and labels else np.asarray(labels, dtype=np.int64))
        )
        out[role] = SplitData(key, f"{path} ({role})", images, lab, tuple(captions) if captions else None)
    return out


# -- MedMNIST npz --------------------------------------------------------------------------------------
def _read_npz(task: TaskCfg, path: Path, roles: Sequence[str], fmt: Format) -> dict[str, SplitData]:
    out = {}
    for role in roles:
        name = task.dataset.splits.get(role, role)
        data = _read(task, path, fmt, name, role)
        lk = f"{name}_labels"
        images, labels = data.images, np.asarray(data.labels)
        if images is None:  # a plug-in's labelled reader that gives no images: SplitData needs them
            raise TaskError(f"{path}: the {fmt.name} reader gave no images for the {role} split ({name})")
        labels = labels.reshape(len(labels), -1)
        n = len(task.classes)
        if labels.shape[1] > 1:
            if not task.multilabel or labels.shape[1] != n:
                raise TaskError(
                    f"{path}: {lk} is multi-hot with {labels.shape[1]} columns; the task needs "
                    f"multilabel: true and {labels.shape[1]} classes (has {n})"
                )
            labels = (labels > 0).astype(np.float32)
        else:
            labels = labels[:, 0].astype(np.int64)
            bad = np.flatnonzero((labels < 0) | (labels >= n))
            if len(bad):
                raise TaskError(
                    f"{path}: {lk}[{bad[0]}] = {labels[bad[0]]} is not a class index 0..{n - 1} "
                    f"({n} classes in {task.source})"
                )
            if task.multilabel:
                labels = np.eye(n, dtype=np.float32)[labels]
        out[role] = SplitData(f"npz:{path.resolve()}::{role}:{name}", f"{path} ({name})", images, labels)
    return out


# -- folder per class ----------------------------------------------------------------------------------
def _scan_classes(task: TaskCfg, path: Path, split: str | None) -> tuple[list[str], list[int]]:
    """Images and class ids of a folder per class (`path/split`, or `path`); every subfolder must be a class."""
    lookup = _label_lookup(task)
    data = _read(task, path, format_named("folder", "labelled"), split)
    root = path / split if split is not None else path
    for name in data.classes or []:
        if name not in lookup:
            raise TaskError(
                f"{root / name}: folder {name!r} is not a known class (classes: {', '.join(task.label_names)})"
            )
    # the folder reader gives every image's path and its class folder's name
    images, labels = cast(list[str], data.images), cast(list[str], data.labels)
    return list(images), [lookup[c] for c in labels]


def _read_folder(task: TaskCfg, path: Path, roles: Sequence[str]) -> dict[str, SplitData]:
    if task.kind == "retrieval":
        raise TaskError(f"{task.source}: {path} is a folder per class; retrieval needs a CSV with captions")
    split_dirs = {r: path / task.dataset.splits.get(r, r) for r in SPLIT_ROLES}
    per_split = any(d.is_dir() for d in split_dirs.values())
    n = len(task.classes)

    def make(images, labels, role) -> SplitData:
        lab: np.ndarray = np.asarray(labels, dtype=np.int64)
        if task.multilabel:
            lab = np.eye(n, dtype=np.float32)[lab]
        return SplitData(
            f"folder:{path.resolve()}::{role}:{list(task.dataset.split_fractions)}:{task.dataset.seed}",
            f"{path} ({role})",
            images,
            lab,
        )

    if per_split:
        out = {}
        for role in roles:
            if not split_dirs[role].is_dir():
                raise TaskError(
                    f"{path}: split folder {split_dirs[role].name!r} not found for the {role} split; "
                    f"set dataset.splits.{role} in {task.source}"
                )
            out[role] = make(*_scan_classes(task, path, split_dirs[role].name), role)
        return out
    images, labels = _scan_classes(task, path, None)
    if not images:
        raise TaskError(
            f"{path}: the dataset is empty (no {'/'.join(IMAGE_SUFFIXES)} images in class folders named "
            f"after the classes: {', '.join(task.label_names)}); fix dataset.path in {task.source}"
        )
    if task.dataset.split_fractions:
        idx = _fraction_split(len(images), task)
    else:
        _no_splits(task, path, roles)
        idx = {"test": np.arange(len(images))}
    return {r: make([images[i] for i in idx[r]], [labels[i] for i in idx[r]], r) for r in roles}


# -- image-caption pairs: WebDataset shards, JSONL, plug-in formats ----------------------------------------
def _read_corpus(task: TaskCfg, path: Path | str, roles: Sequence[str], fmt: Format) -> dict[str, SplitData]:
    """Image-caption pairs, for retrieval; streamed shards are listed once, then read in order (no shuffle), so
    each split reads its shards front to back."""
    if task.kind != "retrieval":
        raise TaskError(
            f"{task.source}: {fmt.name} data hold images and captions, no labels; a {task.kind} task "
            "needs a CSV, .npz or class folders"
        )
    if fmt.corpus is None:
        what = "a folder per class" if fmt.name == "folder" else f"a labelled .{fmt.name}"
        raise TaskError(f"{task.source}: {path} is {what}; retrieval needs a CSV with captions")
    try:
        corpus = open_corpus(path, format=fmt.name)
    except CorpusError as e:
        raise TaskError(f"{task.source}: {e}") from None
    unlisted = getattr(corpus, "unlisted", {})
    if unlisted:  # an eval over part of its data would be silently another eval
        url, why = next(iter(unlisted.items()))
        raise TaskError(f"{task.source}: {len(unlisted)} shard(s) of {path} could not be read ({url}: {why})")
    empty = [i for i, c in enumerate(corpus.captions) if not c.strip()]
    if empty:
        raise TaskError(f"{corpus.describe(empty[0])}: empty caption (retrieval needs one per image)")
    if task.dataset.split_fractions:
        index = _fraction_split(len(corpus), task)
    else:
        _no_splits(task, path, roles)
        index = {"test": np.arange(len(corpus))}
    kind = "webdataset" if fmt.name in ("webdataset", "stream") else fmt.name  # the embedding cache's key, as before
    key = f"{kind}:{path}::{list(task.dataset.split_fractions)}:{task.dataset.seed}"
    return {
        r: SplitData(
            f"{key}:{r}",
            f"{path} ({r})",
            CorpusImages(corpus, index[r]),
            None,
            tuple(corpus.captions[i] for i in index[r]),
        )
        for r in roles
    }
