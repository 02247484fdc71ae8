"""A folder with one subfolder per class (`FOLDER[/SPLIT]/CLASS/**/IMAGE`), the layout of torchvision's
ImageFolder. Registered as the `folder` format (labelled rows): eval classification tasks and `distill corpus`
sources. Images are the files whose name ends in one of `IMAGE_SUFFIXES` (any case), in sorted order per class.
"""

from __future__ import annotations

import os
from pathlib import Path

from cache.sources.base import CorpusError
from cache.sources.formats import Format, LabelledData, register_format
from cache.sources.image_decode import IMAGE_SUFFIXES


def read_class_folder(path: str | os.PathLike, split: str | None = None) -> LabelledData:
    """The images under `path/split` (or `path`), labelled with their class subfolder's name. Keys are the paths
    relative to `path`; `classes` lists every class subfolder, empty ones too (a caller may check the names).
    An empty result is not an error here: each caller says what an empty dataset means for it."""
    base = Path(path)
    root = base / split if split is not None else base
    if not root.is_dir():
        raise CorpusError(f"{base}: split folder {split!r} not found" if split is not None else f"{base}: not a folder")
    rows, where, keys, images, labels, classes = [], [], [], [], [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        classes.append(d.name)
        for f in sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            rel = f.relative_to(base).as_posix()
            images.append(os.path.normpath(f.resolve()))
            keys.append(rel)
            labels.append(d.name)
            rows.append({"split": split} if split is not None else {})
            where.append(f"{base}: {rel}")
    return LabelledData(str(base), ["split"] if split is not None else [], rows, where, keys, images, labels, classes)


register_format(Format("folder", "a folder with one subfolder per class", os.path.isdir, labelled=read_class_folder))
