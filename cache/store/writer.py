"""Writing the feature cache so that a kill -9 at any instant loses at most the chunks in flight.

The scheme (known-safe because it leans only on POSIX rename, fsync and append, never on HDF5's own crash
behaviour):

1. **Segments.** Workers never touch FEATURES.h5. Each process of a run fills its own segment file in
   `FEATURES.h5.segments/` in place, chunk by chunk, each chunk committed by a line in the segment's log
   (`cache.store.segment_writer` says why a kill never damages a committed chunk). The builder commits a chunk in a
   background thread (`PartWriter`) while it embeds the next one, so a kill loses at most two chunks per process.
2. **Fold (the merge).** Only the lock holder changes FEATURES.h5, and only by copy-on-write: copy it to
   `FEATURES.h5.tmp`, rebuild there each teacher's virtual datasets, `done` flags, bad-sample records and
   statistics from the segments (`cache.store.merge`), fsync, then `os.replace` it over the original. FEATURES.h5
   holds no feature data (format 2, `cache.store.layout`), so the copy is megabytes at 24M rows; segments nobody maps
   any more are deleted only after the rename. A kill anywhere leaves the old file or the new one, and the
   committed chunks, which the next fold takes in (folding twice gives the same file).

So a killed run leaves a file that opens and keeps every committed row (mapped, or waiting in a segment that the
next run folds in first). Multi-process runs write one segment per process (never two writers on one file) and
the lock holder folds them: that is the shard-then-merge step, and it copies no feature byte. A format-1 file
(real datasets inside it) is resumed the old way: its teachers' new rows are copied in by the fold.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Callable, Iterable

import h5py
import numpy as np
import torch

import cache.store.layout as L
import cache.store.merge as M
import cache.store.segments as S
from cache.store.disk import h5_on_disk

# the pending teachers' metas and the commit thread live in h5_parts; reachable here (`W.PartWriter`, ...)
from cache.store.parts import (
    PartWriter,  # noqa: F401  (re-exported)
    disk_errors,
    parts_root,
    pending_teachers,
    read_meta,
    teacher_parts_dir,
    write_meta,  # noqa: F401  (re-exported)
)
from cache.store.parts import clean_temporaries as _clean_parts
from cache.store.schema import (
    FORMAT,
    VERSION,
    CacheError,
    attrs_to_dict,
    created_by,
    storage_dtype,
    str_dtype,
    virtual_sources,
)
from cache.store.segment_writer import SegmentWriter, seg_teachers
from cache.store.stats import sums_of_rows, write_stats
from teachers.kernel.modality import MODALITIES, Modality

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
    """Apply `fn` to a copy of `path` (or a new file) and rename it over `path`: all of fn's changes or none.

    The copy is written through `h5_disk.h5_on_disk` (a full disk: one OSError, no crash). `fn` must not read a
    virtual dataset's data through `f`: HDF5 opens its source files with `f`'s file driver, that is, through the
    same Python file object (h5py's fileobj driver), and would read the wrong bytes; read them from `path`."""
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    exists = os.path.exists(path)
    with disk_errors(tmp):
        try:
            if exists:
                shutil.copyfile(path, tmp)
            with h5_on_disk(tmp, "r+" if exists else "w") as f:  # fsynced on close
                fn(f)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        os.replace(tmp, path)
    _fsync_dir(path)


def clean_temporaries(out: str) -> None:
    """Remove half-written files of killed runs (never a committed chunk): FEATURES.h5.tmp, the parts folder's
    and the segment folder's temporaries."""
    _clean_parts(out)
    for p in glob.glob(os.path.join(S.segment_dir(out), ".tmp-*")):
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def _side_file(path: str, what: str, name: str, data: np.ndarray, attrs: dict, **kw) -> tuple[str, int]:
    """Write `data` once into the segment folder of cache `path` (keys, view parameters): (its name, its run)."""
    folder = S.segment_dir(path)
    run = S.next_run(folder)
    fname = f"run-{run:06d}-{what}.h5"
    S.write_small(os.path.join(folder, fname), name, data, attrs, **kw)
    return f"{os.path.basename(folder)}/{fname}", run


def create_file(path: str, keys: list[str], fingerprint: str, source: str) -> None:
    """A new, empty cache: root attrs and /keys (written once into the segment folder, mapped here); teachers
    arrive with their first fold."""
    n = len(keys)
    rel, run = _side_file(path, "keys", L.KEYS, np.array(keys, dtype=object), {}, dtype=str_dtype())

    def fn(f: h5py.File) -> None:
        f.attrs.update(
            {
                L.Root.FORMAT: FORMAT,
                L.Root.VERSION: VERSION,
                L.Root.FINGERPRINT: fingerprint,
                L.Root.CREATED_BY: created_by(),
                L.Root.NUM_ROWS: n,
                L.Root.SOURCE: str(source),
                L.Root.SEGMENTS: os.path.dirname(rel),
                L.Root.FIRST_RUN: run,
            }
        )
        M.make_virtual(f, L.KEYS, (n,), str_dtype(), [(0, n, rel, L.KEYS, (n,), 0)] if n else [], 1, fill=None)
        f.create_group(L.TEACHERS)

    atomic_update(path, fn)


def add_views(path: str, params: np.ndarray, attrs: dict, h5_chunk_rows: int = L.DEFAULT_CHUNK_ROWS) -> None:
    """Store the (N, K, 5 or 8) view parameters once, with `attrs` (their `ViewDist.to_attrs()`); every teacher
    with views replays them."""
    n, k, c = params.shape
    chunks = L.view_chunks(n, k, h5_chunk_rows, c)
    rel, _ = _side_file(path, L.VIEWS, L.VIEW_PARAMS, params.astype(np.float32), {}, chunks=chunks, fletcher32=True)

    def fn(f: h5py.File) -> None:
        f.attrs[L.Root.VERSION] = VERSION
        f.attrs.setdefault(L.Root.SEGMENTS, os.path.dirname(rel))
        M.make_virtual(
            f.require_group(L.VIEWS),
            os.path.basename(L.VIEW_PARAMS),
            (n, k, c),
            np.float32,
            [(0, n, rel, L.VIEW_PARAMS, (n, k, c), 0)] if n else [],
            chunks[0],
            checksummed=True,
        )
        f[L.VIEW_PARAMS].attrs.update(attrs)

    atomic_update(path, fn)


# -- committing rows: segments ----------------------------------------------------------------------------
def write_part(
    out: str,
    name: str,
    rows: np.ndarray,
    image: np.ndarray,
    text: np.ndarray,
    bad_rows: Iterable[int] = (),
    bad_reasons: Iterable[str] = (),
    tokens: np.ndarray | None = None,
    segment: SegmentWriter | None = None,
) -> str:
    """Store one chunk of rows of teacher NAME: into this process's `segment` (the builder commits the chunk once
    every teacher's rows are in, `SegmentWriter.commit`), or, without one, as a one-chunk segment of its own,
    committed at once (its meta must exist, `write_meta`). Returns the segment's path."""
    arrays = {Modality.IMAGE.value: image, Modality.TEXT.value: text, **({} if tokens is None else {L.TOKENS: tokens})}
    if segment is not None:
        segment.put(name, rows, arrays, bad_rows, bad_reasons)
        return segment.path
    stored = read_meta(out, name)
    if stored is None:
        raise CacheError(f"{out}: no meta for teacher {name!r}; write_meta first")
    views = int(np.shape(image)[1]) if np.ndim(image) == 3 else 0
    meta = {
        "attrs": {**stored["attrs"], "embed_dim": int(np.shape(text)[-1]), "views": views},
        "dtype": stored["dtype"],
    }
    bad_rows, bad_reasons = list(bad_rows), list(bad_reasons)
    chunk = np.union1d(np.asarray(rows, np.int64), np.asarray(bad_rows, np.int64))
    folder = S.segment_dir(out)
    h5 = int(stored.get("h5_chunk_rows", L.DEFAULT_CHUNK_ROWS))
    seg = SegmentWriter(
        folder,
        S.next_run(folder),
        0,
        [chunk],
        lambda r: np.ones((len(r), 1), bool),
        seg_teachers({name: meta}),
        max(1, -(-len(chunk) // h5)) * h5,
        h5,
        _fingerprint(out),
        sums=False,
    )
    try:
        dtype = storage_dtype(meta["dtype"])
        seg.put(
            name,
            np.asarray(rows, np.int64),
            {k: np.asarray(v, dtype) for k, v in arrays.items()},
            bad_rows,
            bad_reasons,
        )
        seg.commit(0)
    finally:
        seg.close()
    return seg.path


def _fingerprint(out: str) -> str:
    with h5py.File(out, "r") as f:
        return str(f.attrs[L.Root.FINGERPRINT])


def list_parts(out: str, name: str) -> list[str]:
    """Teacher NAME's committed chunks not yet folded into `out` (as `SEGMENT#CHUNK` labels)."""
    with h5py.File(out, "r") as f:
        first = int(f.attrs.get(L.Root.FIRST_RUN, 0))
        g = f[L.teacher(name)] if L.teacher(name) in f else None
        since = int(g.attrs.get(L.SINCE_RUN, 0)) if g is not None else None
        folded = M.read_folded(g)
    if since is None:
        since = int((read_meta(out, name) or {}).get(L.SINCE_RUN, 0))
    return [
        f"{os.path.basename(s.path)}#{j}"
        for s in M.relevant(_segments(out, first), name, since)
        for j in s.committed[int(folded.get(os.path.basename(s.path), 0)) :]
    ]


def _segments(out: str, first_run: int) -> list[S.SegmentInfo]:
    return [S.SegmentInfo.read(p) for p in S.list_segments(S.segment_dir(out)) if S.run_of(p) >= first_run]


# -- folding segments into the file -----------------------------------------------------------------------
def _ensure_group(f: h5py.File, name: str, meta: dict) -> h5py.Group:
    """Teacher NAME's group with real (format 1) datasets: what a format-1 file holds, and what tests and
    benchmarks write directly. New teachers get virtual datasets over segments (`_ensure_virtual_group`)."""
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
        f.create_dataset(
            L.tokens(name),
            **L.feature_dataset_args(
                n, int(meta["attrs"]["token_dim"]), k, dtype, c, Modality.IMAGE, tokens=grid * grid
            ),
        )
    f.create_dataset(L.done(name), **L.done_dataset_args(n))
    return g


def _ensure_virtual_group(f: h5py.File, name: str, meta: dict) -> h5py.Group:
    if L.teacher(name) in f:
        return f[L.teacher(name)]
    g = f.create_group(L.teacher(name))
    g.attrs.update(meta["attrs"])
    g.attrs["dtype"] = meta["dtype"]
    g.attrs[L.SINCE_RUN] = int(meta.get(L.SINCE_RUN, 0))
    f.create_dataset(L.done(name), **L.done_dataset_args(int(f.attrs[L.Root.NUM_ROWS])))
    return g


def read_bad(f: h5py.File) -> dict[int, str]:
    if L.BAD not in f:
        return {}
    return dict(zip(f[L.BAD_ROWS][:].tolist(), f[L.BAD_REASONS].asstr()[:].tolist()))


def _write_bad(f: h5py.File, bad: dict[int, str], keys_from: str) -> None:
    """The bad-sample records; their keys are read from the original file `keys_from` (its /keys is virtual: see
    `atomic_update` for why the copy being written is never read through a virtual dataset)."""
    if L.BAD in f:
        del f[L.BAD]
    rows = np.array(sorted(bad), dtype=np.int64)
    keys = np.array([], dtype=object)
    if len(rows):
        with h5py.File(keys_from, "r") as orig:
            keys = orig[L.KEYS].asstr()[rows]
    f.create_group(L.BAD)
    f.create_dataset(L.BAD_ROWS, data=rows, dtype=np.int64)
    f.create_dataset(L.BAD_KEYS, data=np.asarray(keys, dtype=object), dtype=str_dtype())
    f.create_dataset(L.BAD_REASONS, data=np.array([bad[int(r)] for r in rows], dtype=object), dtype=str_dtype())


def compute_stats(g: h5py.Group, usable: np.ndarray, block: int = STATS_BLOCK_ROWS) -> None:
    """Mean and covariance of the usable rows' image (all views) and text embeddings, into NAME/stats/, read from
    the group's datasets (a format-1 teacher's; segments keep their own sums, `h5_merge.plan_sums`)."""
    dims = {m.value: int(g[m.value].shape[-1]) for m in MODALITIES}
    with torch.no_grad():
        write_stats(
            g, sums_of_rows(g[Modality.IMAGE.value], g[Modality.TEXT.value], np.flatnonzero(usable), block), dims
        )


def fold(out: str, names: Iterable[str] | None = None) -> dict[str, int]:
    """Take every committed chunk of the segments into `out`, atomically (see the module docstring).

    Returns the rows newly done per teacher (the named ones; default: all). Statistics are (re)written for a
    teacher once every row is either done or recorded as bad.
    """
    with h5py.File(out, "r") as f:
        fp, first = str(f.attrs[L.Root.FINGERPRINT]), int(f.attrs.get(L.Root.FIRST_RUN, 0))
        n = int(f.attrs[L.Root.NUM_ROWS])
        groups = {t: (int(g.attrs.get(L.SINCE_RUN, 0)), M.read_folded(g)) for t, g in f[L.TEACHERS].items()}
    metas = {n: m for n in pending_teachers(out) if (m := read_meta(out, n)) is not None}
    segs = _segments(out, first)
    for s in segs:
        if s.fingerprint != fp:
            raise CacheError(
                f"{s.path} holds rows computed from another corpus; delete it (or choose another --out) and rerun"
            )
    plans: dict[str, M.TeacherPlan] = {}
    for name in sorted(set(groups) | set(metas)):
        since, folded = groups.get(name, (int(metas.get(name, {}).get(L.SINCE_RUN, 0)), {}))
        rel = M.relevant(segs, name, since)
        if name in metas or M.pending_chunks(folded, rel):
            plans[name] = M.plan_teacher(n, rel, name)
    if not plans and not metas:
        _drop_unmapped(out, segs)
        return {}
    added: dict[str, int] = {}

    def fn(f: h5py.File) -> None:
        bad = read_bad(f)
        bad_before = dict(bad)
        new_bad: dict[int, str] = {}
        folder = str(f.attrs.get(L.Root.SEGMENTS, os.path.basename(S.segment_dir(out))))
        for name, plan in plans.items():
            if L.teacher(name) in f:
                g = f[L.teacher(name)]
                meta = {"attrs": attrs_to_dict(g.attrs), "dtype": str(g.attrs["dtype"])}
            else:
                meta = metas[name]
            legacy = L.teacher(name) in f and not f[L.feature(name, Modality.TEXT)].is_virtual
            g = f[L.teacher(name)] if legacy else _ensure_virtual_group(f, name, meta)
            before = g[L.DONE][:]
            if legacy:
                done = before.copy()
                done[M.copy_into(g, plan, M.read_folded(g))] = True
            else:
                M.map_teacher(g, plan, plan.segs[-1].metas[name] if plan.segs else meta, folder)
                done = plan.done
                f.attrs[L.Root.VERSION], f.attrs[L.Root.SEGMENTS] = VERSION, folder
            g[L.DONE][...] = done
            g.attrs[L.FOLDED] = json.dumps(plan.folded)
            added[name] = int(done.sum()) - int(before.sum())
            new_bad.update({r: w for r, w in plan.bad.items() if not done[r]})
        # A bad record is per row (a bad image is bad for every teacher; a teacher's NaN row is dropped for all):
        # it is lifted only once a retried row is done for EVERY teacher in the file, so one teacher succeeding
        # on a row never hides another teacher's failure on it.
        all_done = np.ones(int(f.attrs[L.Root.NUM_ROWS]), dtype=bool)
        for g in f[L.TEACHERS].values():
            all_done &= g[L.DONE][:]
        for r in [r for r in bad if all_done[r] and r not in new_bad]:
            bad.pop(r)
        bad.update(new_bad)
        _write_bad(f, bad, out)
        bad_mask = np.zeros(int(f.attrs[L.Root.NUM_ROWS]), dtype=bool)
        bad_mask[list(bad)] = True
        # statistics cover the usable rows (done, not bad): a teacher that completed earlier is recomputed when
        # another teacher's failures changed the bad rows since
        for name, g in f[L.TEACHERS].items():
            if name not in plans and bad == bad_before:
                continue
            done = g[L.DONE][:]
            if not (done | bad_mask).all():
                continue
            if g[Modality.TEXT.value].is_virtual:
                since = int(g.attrs.get(L.SINCE_RUN, 0))
                plan = plans.get(name) or M.plan_teacher(len(done), M.relevant(segs, name, since), name)
                with torch.no_grad():
                    write_stats(g, M.plan_sums(plan, done & ~bad_mask), M.dims_of({"attrs": dict(g.attrs)}))
            else:
                compute_stats(g, done & ~bad_mask)

    atomic_update(out, fn)
    for name in metas:  # only now: the rows are safe in the file
        shutil.rmtree(teacher_parts_dir(out, name), ignore_errors=True)
    root = parts_root(out)
    if os.path.isdir(root) and not os.listdir(root):
        os.rmdir(root)
    _drop_unmapped(out, segs)
    return {n: c for n, c in added.items() if names is None or n in set(names)}


def _drop_unmapped(out: str, segs: list[S.SegmentInfo]) -> None:
    """Delete the segments (and their logs and sums) that no virtual dataset of `out` maps any more: runs killed
    before their first commit, rows superseded by retries, a format-1 teacher's rows copied in, a deleted group."""
    with h5py.File(out, "r") as f:
        mapped = {os.path.basename(n) for n in virtual_sources(f)}
    for s in segs:
        if os.path.basename(s.path) not in mapped:
            for p in (s.path, S.log_path(s.path), S.sums_path(s.path)):
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass


def ensure_writable_target(out: str) -> None:
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise CacheError(f"output folder {d} does not exist; create it first")
