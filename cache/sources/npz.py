"""MedMNIST-style `.npz` files: arrays `SPLIT_images` (uint8, (N, H, W) grey or (N, H, W, 3|4) colour) and
`SPLIT_labels` ((N,) or (N, 1) class indices, or (N, C) multi-hot), one pair per split (train, val, test, ...).

Registered as the `npz` format (labelled rows): eval classification tasks read one split per role, `distill corpus`
reads one split or all of them. Checks made here for both: the split's two keys exist (a missing one is named with
the keys the file has), images are uint8 of a supported shape, images and labels have as many rows.
"""

from __future__ import annotations

import os

import numpy as np

from cache.sources.base import CorpusError
from cache.sources.formats import Format, LabelledData, has_suffix, register_format

NPZ_SPLITS = ("train", "val", "test")  # the usual order of the splits of a file, before any other names


def npz_splits(files: set[str]) -> list[str]:
    """The splits of an npz (names with a `_images` array): train, val, test first, then the others sorted."""
    named = {k[: -len("_images")] for k in files if k.endswith("_images")}
    return [s for s in NPZ_SPLITS if s in named] + sorted(named - set(NPZ_SPLITS))


def read_npz(path: str | os.PathLike, split: str | None = None) -> LabelledData:
    """The rows of one split (or of every split, in `npz_splits` order, when `split` is None): images as uint8
    arrays ((N, H, W) or (N, H, W, 3|4); a single channel is dropped), labels (N, C) as stored, and one text column
    `split`. Keys are `SPLIT/INDEX`; each row's `where` is `FILE SPLIT_images[INDEX]`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CorpusError(f"{path} not found")
    with np.load(path, allow_pickle=False) as z:
        files = set(z.files)
        present = npz_splits(files)
        if split is not None:
            for k in (f"{split}_images", f"{split}_labels"):
                if k not in files:
                    raise CorpusError(
                        f"{path}: no split {split!r}: key {k!r} not found (keys: "
                        f"{', '.join(sorted(files))}); splits here: {', '.join(present) or 'none'}"
                    )
            present = [split]
        if not present:
            raise CorpusError(
                f"{path}: no SPLIT_images arrays (keys: {', '.join(sorted(files))}); "
                "expected MedMNIST keys such as train_images and train_labels"
            )
        images, labels, rows, where, keys = [], [], [], [], []
        for name in present:
            ik, lk = f"{name}_images", f"{name}_labels"
            if lk not in files:
                raise CorpusError(f"{path}: {ik} has no {lk}")
            imgs, labs = z[ik], z[lk]
            if imgs.dtype != np.uint8 or not (imgs.ndim == 3 or (imgs.ndim == 4 and imgs.shape[-1] in (1, 3, 4))):
                raise CorpusError(
                    f"{path}: {ik} must be uint8 (N, H, W) grey or (N, H, W, 3) RGB images (or "
                    f"RGBA), got {imgs.dtype} {imgs.shape} (3D volumes are not supported)"
                )
            if imgs.ndim == 4 and imgs.shape[-1] == 1:
                imgs = imgs[..., 0]
            if len(labs) != len(imgs):
                raise CorpusError(f"{path}: {ik} has {len(imgs)} rows but {lk} has {len(labs)}")
            images.append(imgs)
            labels.append(np.asarray(labs).reshape(len(labs), -1))
            rows += [{"split": name} for _ in range(len(imgs))]
            where += [f"{path} {ik}[{i}]" for i in range(len(imgs))]
            keys += [f"{name}/{i}" for i in range(len(imgs))]
    same = len({a.shape[1:] for a in images}) == 1
    stacked = np.concatenate(images) if same else [img for a in images for img in a]
    widths = {a.shape[1] for a in labels}
    label_array = np.concatenate(labels) if len(widths) == 1 else None
    if label_array is None:
        raise CorpusError(f"{path}: the splits' label arrays differ in width ({sorted(widths)}); read one split")
    return LabelledData(path, ["split"], rows, where, keys, stacked, label_array)


register_format(Format("npz", "a MedMNIST-style .npz", has_suffix(".npz"), labelled=read_npz))
