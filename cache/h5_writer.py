"""Writing the feature cache so that a kill -9 at any instant loses at most the chunks in flight.

The scheme (known-safe because it leans only on POSIX rename, never on HDF5's own crash behaviour):

1. **Parts.** Workers never touch FEATURES.h5. Each finished chunk of rows becomes one small `.npz` file in
   `FEATURES.h5.parts/NAME/` (rows, image and text embeddings, bad samples), written to a temporary name,
   fsynced, then renamed: a part either exists complete or not at all. That rename is the commit. The builder
   commits a chunk in a background thread (`PartWriter`) while it embeds the next one, so a kill loses at most
   two chunks per process: the one being written and the one being embedded. (`cache.h5_parts`.)
2. **Fold.** Only the lock holder changes FEATURES.h5, and only by copy-on-write: copy it to `FEATURES.h5.tmp`,
   write the parts' rows and `done` flags (and statistics, bad-sample records) into the copy, fsync, then
   `os.replace` it over the original. Parts are deleted only after the rename, so a kill anywhere leaves the old
   complete file or the new one, and the parts not yet folded; folding a part twice writes the same values.

So a killed run leaves a file that opens and keeps every committed row (in the file, or in parts that the next
run folds in first). The cost is one file copy per fold (once per teacher per run), small next to embedding.
Multi-process runs write parts from every process (one file each, never two writers on one file) and the
lock holder folds them: that is the shard-then-merge step.
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Iterable

import h5py
import numpy as np

from teachers.modality import MODALITIES, Modality

from . import layout as L
# the parts (step 1) live in h5_parts; their names stay reachable here (`W.write_part`, ...) for the builder
from .h5_parts import (PartWriter, clean_temporaries, disk_errors, list_parts, parts_root,  # noqa: F401
                       pending_teachers, read_meta, teacher_parts_dir, write_meta, write_part)
from .schema import FORMAT, VERSION, CacheError, created_by, storage_dtype, str_dtype

STATS_BLOCK_ROWS = 4096


# -- atomic file replacement ------------------------------------------------------------------------------
def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        _fsync_path(os.path.dirname(os.path.abspath(path)) or ".")
    except OSError:  # some filesystems refuse fsync on directories; rename is still atomic
        pass


def atomic_update(path: str, fn: Callable[[h5py.File], None]) -> None:
    """Apply `fn` to a copy of `path` (or a new file) and rename it over `path`: all of fn's changes or none."""
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    exists = os.path.exists(path)
    with disk_errors(tmp):
        try:
            if exists:
                shutil.copyfile(path, tmp)
            with h5py.File(tmp, "r+" if exists else "w") as f:
                fn(f)
            _fsync_path(tmp)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        os.replace(tmp, path)
    _fsync_dir(path)


def create_file(path: str, keys: list[str], fingerprint: str, source: str) -> None:
    """A new, empty cache: root attrs and /keys; teachers arrive with their first fold."""
    def fn(f: h5py.File) -> None:
        f.attrs.update({L.Root.FORMAT: FORMAT, L.Root.VERSION: VERSION, L.Root.FINGERPRINT: fingerprint,
                        L.Root.CREATED_BY: created_by(), L.Root.NUM_ROWS: len(keys), L.Root.SOURCE: str(source)})
        f.create_dataset(L.KEYS, data=np.array(keys, dtype=object), dtype=str_dtype())
        f.create_group(L.TEACHERS)
    atomic_update(path, fn)


def add_views(path: str, params: np.ndarray, attrs: dict, h5_chunk_rows: int = L.DEFAULT_CHUNK_ROWS) -> None:
    """Store the (N, K, 5 or 8) view parameters once, with `attrs` (their `ViewDist.to_attrs()`); every teacher
    with views replays them."""
    def fn(f: h5py.File) -> None:
        n, k, c = params.shape
        ds = f.create_dataset(L.VIEW_PARAMS, data=params.astype(np.float32),
                              chunks=L.view_chunks(n, k, h5_chunk_rows, c))
        ds.attrs.update(attrs)
    atomic_update(path, fn)


# -- folding parts into the file --------------------------------------------------------------------------
def _ensure_group(f: h5py.File, name: str, meta: dict) -> h5py.Group:
    if L.teacher(name) in f:
        return f[L.teacher(name)]
    n = int(f.attrs[L.Root.NUM_ROWS])
    d, k = int(meta["attrs"]["embed_dim"]), int(meta["attrs"]["views"])
    dtype = storage_dtype(meta["dtype"])
    c = int(meta.get("h5_chunk_rows", L.DEFAULT_CHUNK_ROWS))
    g = f.create_group(L.teacher(name))
    g.attrs.update(meta["attrs"])
    g.attrs["dtype"] = meta["dtype"]
    for m in MODALITIES:
        f.create_dataset(L.feature(name, m), **L.feature_dataset_args(n, d, k, dtype, c, m))
    grid = int(meta["attrs"].get("tokens", 0))
    if grid:  # (N, [K,] G*G, Dv) patch tokens
        f.create_dataset(L.tokens(name), **L.feature_dataset_args(n, int(meta["attrs"]["token_dim"]), k, dtype, c,
                                                                   Modality.IMAGE, tokens=grid * grid))
    f.create_dataset(L.done(name), **L.done_dataset_args(n))
    return g


def _write_rows(ds: h5py.Dataset, rows: np.ndarray, values: np.ndarray) -> None:
    if len(rows) == 0:
        return
    if rows[-1] - rows[0] + 1 == len(rows):  # contiguous: one hyperslab
        ds[int(rows[0]):int(rows[-1]) + 1] = values
    else:
        ds[rows] = values


def read_bad(f: h5py.File) -> dict[int, str]:
    if L.BAD not in f:
        return {}
    return dict(zip(f[L.BAD_ROWS][:].tolist(), f[L.BAD_REASONS].asstr()[:].tolist()))


def _write_bad(f: h5py.File, bad: dict[int, str]) -> None:
    if L.BAD in f:
        del f[L.BAD]
    rows = np.array(sorted(bad), dtype=np.int64)
    keys = f[L.KEYS].asstr()[rows] if len(rows) else np.array([], dtype=object)
    f.create_group(L.BAD)
    f.create_dataset(L.BAD_ROWS, data=rows, dtype=np.int64)
    f.create_dataset(L.BAD_KEYS, data=np.asarray(keys, dtype=object), dtype=str_dtype())
    f.create_dataset(L.BAD_REASONS, data=np.array([bad[int(r)] for r in rows], dtype=object), dtype=str_dtype())


def compute_stats(g: h5py.Group, usable: np.ndarray, block: int = STATS_BLOCK_ROWS) -> None:
    """Mean and covariance of the usable rows' image (all views) and text embeddings, into NAME/stats/."""
    if L.STATS in g:
        del g[L.STATS]
    s = g.create_group(L.STATS)
    for what in MODALITIES:
        ds = g[what]
        d = ds.shape[-1]
        total, outer, n = np.zeros(d), np.zeros((d, d)), 0
        for start in range(0, ds.shape[0], block):
            m = usable[start:start + block]
            if not m.any():
                continue
            x = ds[start:start + block][m].astype(np.float64).reshape(-1, d)
            total += x.sum(0)
            outer += x.T @ x
            n += len(x)
        mean = total / max(n, 1)
        cov = (outer - n * np.outer(mean, mean)) / max(n - 1, 1)
        s.create_dataset(f"{what}_mean", data=mean.astype(np.float32))
        s.create_dataset(f"{what}_cov", data=cov.astype(np.float32))
        s.attrs[f"{what}_count"] = n
    s.attrs["count"] = int(usable.sum())


def fold(out: str, names: Iterable[str] | None = None) -> dict[str, int]:
    """Fold committed parts of the named teachers (default: all pending) into `out`, atomically.

    Returns the number of rows folded per teacher. Statistics are (re)written for a teacher once every row is
    either done or recorded as bad.
    """
    names = pending_teachers(out) if names is None else [n for n in names if n in pending_teachers(out)]
    plan = {n: (read_meta(out, n), list_parts(out, n)) for n in names}
    plan = {n: (m, p) for n, (m, p) in plan.items() if m is not None}
    if not plan:
        return {}
    folded: dict[str, int] = {}

    def fn(f: h5py.File) -> None:
        bad = read_bad(f)
        bad_before = dict(bad)
        groups, new_bad, new_done = {}, {}, set()
        for name, (meta, parts) in plan.items():
            g = groups[name] = _ensure_group(f, name, meta)
            done = g[L.DONE][:]
            count = 0
            for p in parts:
                with np.load(p, allow_pickle=False) as z:
                    rows = z["rows"]
                    if len(rows):
                        for m in MODALITIES:
                            _write_rows(g[m], rows, z[m])
                        if L.TOKENS in g:
                            _write_rows(g[L.TOKENS], rows, z[L.TOKENS])
                        done[rows] = True
                        count += len(rows)
                        new_done.update(rows.tolist())
                    for r, reason in zip(z["bad_rows"].tolist(), z["bad_reasons"].tolist()):
                        if not done[r]:
                            new_bad[int(r)] = str(reason)
            g[L.DONE][...] = done
            folded[name] = count
        # A bad record is per row (a bad image is bad for every teacher; a teacher's NaN row is dropped for all):
        # it is lifted only once a retried row is done for EVERY teacher in the file, so one teacher succeeding
        # on a row never hides another teacher's failure on it.
        all_done = np.ones(int(f.attrs[L.Root.NUM_ROWS]), dtype=bool)
        for g in f[L.TEACHERS].values():
            all_done &= g[L.DONE][:]
        for r in new_done:
            if all_done[r] and r not in new_bad:
                bad.pop(r, None)
        bad.update(new_bad)
        _write_bad(f, bad)
        bad_mask = np.zeros(int(f.attrs[L.Root.NUM_ROWS]), dtype=bool)
        bad_mask[list(bad)] = True
        # statistics cover the usable rows (done, not bad): a teacher that completed earlier is recomputed when
        # another teacher's failures changed the bad rows since
        for name, g in f[L.TEACHERS].items():
            if name not in groups and bad == bad_before:
                continue
            done = g[L.DONE][:]
            if (done | bad_mask).all():
                compute_stats(g, done & ~bad_mask)

    atomic_update(out, fn)
    for name, (_, parts) in plan.items():  # only now: the rows are safe in the file
        for p in parts:
            os.remove(p)
        d = teacher_parts_dir(out, name)
        if not list_parts(out, name):
            shutil.rmtree(d, ignore_errors=True)
    root = parts_root(out)
    if os.path.isdir(root) and not os.listdir(root):
        os.rmdir(root)
    return folded


def ensure_writable_target(out: str) -> None:
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise CacheError(f"output folder {d} does not exist; create it first")
